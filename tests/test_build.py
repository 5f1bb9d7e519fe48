"""The build: CMakeLists.txt and setup.py list the same sources; CUDA kernels are compiled where a
CUDA toolkit and a CUDA build of torch exist; the package still imports without _C."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import pyfast

ROOT = Path(__file__).resolve().parents[1]


def setup_py_lists():
    tree = ast.parse((ROOT / "setup.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("CPU_SOURCES", "CUDA_SOURCES"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


def cmake_list(name):
    text = (ROOT / "CMakeLists.txt").read_text()
    m = re.search(rf"set\({name}\s+(.*?)\)", text, re.S)
    assert m, f"CMakeLists.txt has no set({name} ...)"
    return m.group(1).split()


def test_cmake_and_setup_list_the_same_sources():
    lists = setup_py_lists()
    assert cmake_list("PYFAST_CPU_SOURCES") == lists["CPU_SOURCES"]
    assert cmake_list("PYFAST_CUDA_SOURCES") == lists["CUDA_SOURCES"]
    on_disk = {
        str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu")
    }
    assert on_disk == set(lists["CPU_SOURCES"]) | set(lists["CUDA_SOURCES"])


def test_every_schema_has_a_cpu_kernel_and_a_python_wrapper():
    text = (ROOT / "csrc/registration.cpp").read_text()
    schemas = re.findall(r'm\.def\(\s*"(\w+)\(', text)
    assert schemas
    cpu_impls = "".join(p.read_text() for p in (ROOT / "csrc/cpu").glob("*.cpp"))
    for op in schemas:
        assert f'm.impl("{op}"' in cpu_impls, f"{op} has no CPU implementation"
        assert hasattr(torch.ops.pyfast, op)


def test_cuda_kernels_built_where_toolkit_exists():
    wanted = (
        torch.version.cuda is not None
        and shutil.which("nvcc") is not None
        and os.environ.get("PYFAST_BUILD_CUDA", "1") != "0"
    )
    assert pyfast.HAS_C
    assert pyfast.HAS_CUDA_KERNELS == wanted, pyfast.extension_info()


def test_import_without_extension_warns_once_and_falls_back():
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import pyfast, pyfast.ops, pyfast.optim\n"
        "assert not pyfast.HAS_C\n"
        "msgs = [str(x.message) for x in w if 'pyfast' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
        "opt = pyfast.optim.FusedAdamW([p], lr=0.1, max_grad_norm=1.0); opt.step()\n"
        "q = torch.nn.Parameter(torch.ones(3)); q.grad = torch.ones(3)\n"
        "torch.nn.utils.clip_grad_norm_([q], 1.0); torch.optim.AdamW([q], lr=0.1).step()\n"
        "torch.testing.assert_close(p.detach(), q.detach())\n"
        "print('fallback ok')\n"
    )
    env = dict(os.environ, PYFAST_DISABLE_C="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout


def test_extension_records_the_torch_it_was_built_against():
    from pyfast import _extension

    assert pyfast.HAS_C
    assert _extension._C.torch_version == torch.__version__
    assert _extension.built_torch_of(_extension._C.__file__) == torch.__version__
    assert pyfast.extension_info()["built_against_torch"] == torch.__version__


_MISMATCH = (
    "import importlib, sys, torch\n"
    "torch.__version__ = '0.0.0+other'\n"
    "if sys.argv[1] == 'unloadable':  # as a _C built against another torch's ABI fails\n"
    "    real = importlib.import_module\n"
    "    def fail(name, *a):\n"
    "        if name == 'pyfast._C':\n"
    "            raise ImportError('_C.so: undefined symbol: _ZN3c10')\n"
    "        return real(name, *a)\n"
    "    importlib.import_module = fail\n"
    "try:\n"
    "    import pyfast\n"
    "except ImportError as exc:\n"
    "    print(type(exc).__name__, exc)\n"
)


def test_a_build_against_another_torch_fails_with_the_rebuild_command():
    for case in ("loads", "unloadable"):
        out = subprocess.run(
            [sys.executable, "-c", _MISMATCH, case], cwd=ROOT, capture_output=True, text=True,
            timeout=120, env={k: v for k, v in os.environ.items() if k != "PYFAST_DISABLE_C"},
        )  # fmt: skip
        line = out.stdout.strip()
        assert line.count("\n") == 0 and line.startswith("ExtensionMismatch pyfast._C"), out
        assert f"built against torch {torch.__version__} but torch 0.0.0+other" in line
        assert "pip install --no-build-isolation --no-deps --force-reinstall -e" in line


def test_cuda_targets_ampere_ada_hopper_and_ptx_by_default():
    tree = ast.parse((ROOT / "setup.py").read_text())
    keep = [n for n in tree.body if isinstance(n, ast.Assign | ast.FunctionDef)
            and getattr(n, "name", None) in (None, "default_gencode")]  # fmt: skip
    scope: dict = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), scope)
    assert scope["default_gencode"]() == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_86,code=sm_86",
        "-gencode=arch=compute_89,code=sm_89",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    assert 'os.environ.get("TORCH_CUDA_ARCH_LIST")' in (ROOT / "setup.py").read_text()


def test_distribution_name_is_not_the_taken_pyfast():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^name = "pyfast-llm"', text, re.M)
    from pyfast._extension import DISTRIBUTION

    assert DISTRIBUTION == "pyfast-llm"
