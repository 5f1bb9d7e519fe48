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
