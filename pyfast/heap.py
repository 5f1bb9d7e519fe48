"""Giving freed heap memory back to the OS during CPU training steps (glibc's ``malloc_trim``).

On the CPU torch allocates tensors with glibc's ``malloc``. Blocks under glibc's mmap threshold
(which grows to 32 MB once large blocks have been freed) come from the heap, and a freed block
stays resident until a block of a fitting size reuses it. A training step frees and allocates
activations, recomputed tensors and gradients of many sizes in a changing order, so the holes
left by one phase rarely fit the next: for one DPO step of SmolLM2-135M (benchmarks/
bench_align.py) the heap held ~0.5-1 GB of freed but resident memory at the step's peak, on top
of ~2 GB in use.

:class:`HeapTrimmer` calls ``malloc_trim(0)`` — which hands the whole pages of every free heap
block back to the kernel — when the decoder body's forward finishes (the forward's temporaries
are gone, its saved activations stay) and when backward reaches every `every`-th decoder block
(the activations of the blocks behind it are freed). The resident peak falls towards the memory
actually in use; the price is the trim itself (tens of milliseconds) and the page faults of
reusing trimmed pages, about 15% of a step in that benchmark. Results are unchanged: only where
freed memory lives changes. It is ``trim_heap_every`` in a training or alignment config (0: off).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS, Windows)."""
    try:
        fn = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def available() -> bool:
    """Whether this process's C library can trim its heap (glibc)."""
    return _malloc_trim() is not None


def trim() -> None:
    """Returns the free pages of every heap arena to the OS (a no-op without glibc)."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


def decoder_body(model: nn.Module) -> nn.Module:
    """The decoder body of a Hugging Face causal LM (``get_decoder()``), which has its blocks
    as ``.layers``."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"trim_heap_every: {type(model).__name__} has no decoder blocks to hook "
            "(get_decoder().layers)"
        )
    return body


class HeapTrimmer:
    """Trims the heap after each forward of `model`'s decoder body and when backward reaches
    every `every`-th decoder block (counted from the last). :meth:`remove` undoes it.

    Raises ValueError where it cannot work: `every` < 1, no glibc, no decoder blocks.
    """

    def __init__(self, model: nn.Module, every: int):
        if every < 1:
            raise ValueError(f"trim_heap_every must be >= 1 to trim (got {every})")
        if not available():
            raise ValueError("trim_heap_every needs glibc's malloc_trim (Linux with glibc)")
        body = decoder_body(model)
        self.every = every
        self.trims = 0  # how many times it trimmed (for tests and logs)
        self._handles = [body.register_forward_hook(self._after_forward)]
        for layer in list(body.layers)[::-1][every::every]:
            self._handles.append(layer.register_forward_hook(self._hook_output))

    def _trim(self) -> None:
        trim()
        self.trims += 1

    def _after_forward(self, module, args, output) -> None:
        if torch.is_grad_enabled():
            self._trim()

    def _hook_output(self, module, args, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.requires_grad and torch.is_grad_enabled():
            out.register_hook(self._on_grad)

    def _on_grad(self, grad: torch.Tensor) -> None:
        self._trim()  # returns None: the gradient passes unchanged

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
