"""Heap trimming during training steps (pyfast.heap, `trim_heap_every`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pyfast import heap
from pyfast.train import Recipe, load_config
from tests.conftest import tiny_llama

needs_glibc = pytest.mark.skipif(not heap.available(), reason="no glibc malloc_trim")


@needs_glibc
def test_trimmer_runs_after_forward_and_every_nth_block_of_backward(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "trim", lambda: calls.append(1))
    model = tiny_llama(64, num_hidden_layers=5).train()
    twin = tiny_llama(64, num_hidden_layers=5).train()  # same seed: same weights
    trimmer = heap.HeapTrimmer(model, every=2)
    ids = torch.randint(0, 64, (2, 7))
    model(ids, labels=ids).loss.backward()
    # once after the body's forward, then when backward reaches blocks 2 and 0 (every 2nd of
    # 4, 3, 2, 1, 0 counted from the last, after the first 2)
    assert len(calls) == 3 == trimmer.trims
    twin(ids, labels=ids).loss.backward()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)  # trimming moves memory, never values
    with torch.no_grad():
        model(ids)  # no backward to prepare for: no trim
    assert len(calls) == 3
    trimmer.remove()
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 3


def test_trimmer_refuses_what_it_cannot_do(monkeypatch):
    model = tiny_llama(64)
    with pytest.raises(ValueError, match="trim_heap_every must be >= 1"):
        heap.HeapTrimmer(model, every=0)
    with pytest.raises(ValueError, match="has no decoder blocks"):
        heap.HeapTrimmer(torch.nn.Linear(2, 2), every=1)
    monkeypatch.setattr(heap, "available", lambda: False)
    with pytest.raises(ValueError, match="needs glibc's malloc_trim"):
        heap.HeapTrimmer(model, every=1)


@needs_glibc
def test_trim_hands_freed_heap_pages_back():
    """Freed 1 MB blocks between live ones stay resident until trimmed (glibc's mmap threshold
    pinned at 32 MB, so that the blocks come from the heap as in a training step)."""
    script = textwrap.dedent(
        """
        import torch
        from pyfast.heap import trim

        def rss_mb():
            with open("/proc/self/status") as f:
                line = next(x for x in f if x.startswith("VmRSS:"))
            return int(line.split()[1]) / 1024

        blocks = [torch.ones(256 * 1024) for _ in range(400)]  # 400 x 1 MB, touched
        del blocks[::2]  # 200 MB of holes between live blocks
        before = rss_mb()
        trim()
        print(before - rss_mb())
        """
    )
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": path}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, check=True)  # fmt: skip
    assert float(out.stdout.split()[-1]) > 150  # of the 200 MB freed


@needs_glibc
def test_recipe_option(base_overrides, tmp_path):
    recipe = Recipe(load_config(None, [*base_overrides, "trim_heap_every=1", "max_steps=2",
                                       "eval.every=0", "save_final=false"]))  # fmt: skip
    recipe.run()
    # 2 steps x (1 forward + 1 of the tiny model's 2 blocks in backward) at least
    assert recipe.heap_trimmer.trims >= 4
    with pytest.raises(ValueError, match="trim_heap_every must be >= 0"):
        load_config(None, ["trim_heap_every=-1"])
    with pytest.raises(ValueError, match="trim_heap_every applies to CPU training"):
        load_config(None, ["trim_heap_every=2", "device=cuda"])
