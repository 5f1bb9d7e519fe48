"""Builds pyfast._C, the torch extension behind torch.ops.pyfast.*.

CPU kernels are always built, with the host's SIMD level (AVX512 / AVX2 / DEFAULT, from
torch.backends.cpu.get_cpu_capability(), or PYFAST_CPU_CAPABILITY). CUDA kernels are built when
nvcc is found and torch is a CUDA build, unless PYFAST_BUILD_CUDA=0 (quick CPU-only iteration).
CUDA targets sm_80, sm_86, sm_89, sm_90 plus compute_90 PTX unless TORCH_CUDA_ARCH_LIST says
otherwise. The torch version compiled against is recorded in the extension (``_C.torch_version``).

Install with `pip install --no-build-isolation -e .` after torch is installed, so that the
extension is compiled against the very torch it runs with (see README, "Installing").
"""

import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

# A `nvcc` wrapper on PATH (as on these machines) makes torch guess CUDA_HOME=/usr/local; point
# it at the real toolkit when one sits in the conventional place (before torch reads it).
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

# The source lists are explicit; tests/test_build.py checks that CMakeLists.txt lists the same.
CPU_SOURCES = [
    "csrc/registration.cpp",
    "csrc/cpu/fused_adamw.cpp",
    "csrc/cpu/grad_norm.cpp",
    "csrc/cpu/grad_mask.cpp",
    "csrc/cpu/token_logprobs.cpp",
    "csrc/cpu/linear_token_logprobs.cpp",
    "csrc/cpu/rms_norm.cpp",
    "csrc/cpu/swiglu.cpp",
    "csrc/cpu/geglu.cpp",
    "csrc/cpu/trie_attention.cpp",
    "csrc/cpu/rotary.cpp",
]
CUDA_SOURCES = [
    "csrc/cuda/fused_adamw.cu",
    "csrc/cuda/grad_mask.cu",
    "csrc/cuda/token_logprobs.cu",
]

# -m flags that match each at::vec capability macro.
CPU_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}


def cpu_capability():
    """The SIMD level to compile the CPU kernels for (the build host's, unless overridden)."""
    import torch

    cap = os.environ.get("PYFAST_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    cap = cap.upper()
    if cap.startswith("AVX512"):
        cap = "AVX512"
    if cap not in CPU_CAPABILITY_FLAGS:
        cap = "DEFAULT"
    return cap


# Default CUDA targets: Ampere (A100 sm_80; A10/RTX 30xx sm_86), Ada (L4/L40/RTX 40xx sm_89) and
# Hopper (H100/H200 sm_90) as machine code, plus compute_90 PTX that newer GPUs JIT-compile.
# TORCH_CUDA_ARCH_LIST (torch's own variable, e.g. "9.0" or "8.0;8.6+PTX") replaces the list.
DEFAULT_CUDA_ARCHS = ["80", "86", "89", "90"]


def default_gencode() -> list[str]:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in DEFAULT_CUDA_ARCHS]
    last = DEFAULT_CUDA_ARCHS[-1]
    return flags + [f"-gencode=arch=compute_{last},code=compute_{last}"]


def torch_version() -> str:
    """The version of the torch being compiled against, recorded in _C (pyfast._extension
    refuses a _C whose torch differs from the one it runs with)."""
    import torch

    return torch.__version__


def cuda_wanted():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("PYFAST_BUILD_CUDA", "1") == "0":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def nvidia_wheel_includes():
    """Header folders of the NVIDIA wheels torch depends on (cuBLAS, cuSPARSE, cuSOLVER...).

    ATen's CUDA headers include cublas_v2.h etc.; a bare toolkit may lack them; the wheels
    have them.
    """
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in list(nvidia.__path__):
        for header in glob.glob(os.path.join(root, "*", "include", "cublas_v2.h")):
            found.append(os.path.dirname(header))
    return sorted(set(found))


def loaded_libstdcxx() -> str | None:
    """The libstdc++ this process (Python + torch) has loaded, from /proc/self/maps (Linux)."""
    import torch  # noqa: F401 - loads libstdc++ through libtorch

    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so"):
                    return path
    except OSError:
        pass
    return None


def shared_libstdcxx_args() -> list[str]:
    """Link arguments that keep the extension on the process's shared libstdc++.

    A compiler without a shared libstdc++ of its own (seen on a CUDA image whose /opt/gcc holds
    only libstdc++.a) links a second, static copy into the extension. Its locale state is never
    initialised, so the first error message that formats a number (every argument check does)
    crashes the process. Naming the libstdc++.so that torch already loaded ahead of the
    compiler's -lstdc++ resolves those symbols there instead.
    """
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    exe = shutil.which(shlex.split(cxx)[0])
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-print-file-name=libstdc++.so"], capture_output=True,
                             text=True, timeout=60).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    if os.path.isabs(out) and os.path.exists(out):
        return []  # the compiler links a shared libstdc++ itself
    lib = loaded_libstdcxx()
    if lib is None:
        return []
    print(f"pyfast: {exe} has no shared libstdc++; linking {lib}", file=sys.stderr)
    return [lib]


def extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cap = cpu_capability()
    cxx = [
        "-O3",
        "-fopenmp",
        "-fno-math-errno",
        "-Wno-unknown-pragmas",
        "-g0",  # Python's CFLAGS carry -g: debug info doubles compile time and .so size
        f"-DCPU_CAPABILITY={cap}",
        f"-DCPU_CAPABILITY_{cap}",
        f'-DPYFAST_CPU_CAPABILITY_NAME="{cap}"',
        f'-DPYFAST_TORCH_VERSION="{torch_version()}"',
    ] + CPU_CAPABILITY_FLAGS[cap]
    if cap == "DEFAULT":  # at::vec's generic path defines no CPU_CAPABILITY_DEFAULT macro use
        cxx = [f for f in cxx if f != "-DCPU_CAPABILITY_DEFAULT"]
    link = ["-fopenmp"] + shared_libstdcxx_args()
    if not cuda_wanted():
        print(f"pyfast: building CPU kernels only (SIMD: {cap})", file=sys.stderr)
        return [
            CppExtension(
                "pyfast._C", CPU_SOURCES, extra_compile_args={"cxx": cxx}, extra_link_args=link
            )
        ]
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-DPYFAST_WITH_CUDA"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc += default_gencode()
    print(f"pyfast: building CPU (SIMD: {cap}) and CUDA kernels", file=sys.stderr)
    return [
        CUDAExtension(
            "pyfast._C",
            CPU_SOURCES + CUDA_SOURCES,
            include_dirs=nvidia_wheel_includes(),
            extra_compile_args={"cxx": cxx + ["-DPYFAST_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link,
        )
    ]


def build_ext_cls():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    packages=find_packages(include=["pyfast", "pyfast.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_cls()},
)
