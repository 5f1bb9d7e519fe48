"""Every CUDA kernel of pyfast once, on small awkward shapes, checked against its pure-PyTorch
reference: a short program for compute-sanitizer (memcheck, racecheck, initcheck), which slows
kernels down a hundredfold, so the full test suite would not fit under it.

    compute-sanitizer --tool memcheck python benchmarks/cuda_sanitize.py [cuda|cpu]

Exits non-zero when a result differs from its reference (the sanitizer's own exit status reports
memory errors and races).
"""

from __future__ import annotations

import sys

import torch

import pyfast
from pyfast.ops import reference


def _close(name: str, got, want, rtol=1e-5, atol=1e-6) -> bool:
    ok = all(
        torch.allclose(g.float().cpu(), w.float().cpu(), rtol=rtol, atol=atol)
        for g, w in zip(got, want, strict=True)
    )
    print(f"{name:36s} {'ok' if ok else 'MISMATCH'}")
    return ok


def main() -> int:
    name = sys.argv[1] if len(sys.argv) > 1 else "cuda"  # "cpu": a dry run here
    if len(sys.argv) > 2 or name not in ("cuda", "cpu"):
        print(f"usage: cuda_sanitize.py [cuda|cpu], got {sys.argv[1:]}", file=sys.stderr)
        return 2
    dev = torch.device(name)
    info = pyfast.extension_info()
    if not info.get("compiled") or (
        dev.type == "cuda" and not (torch.cuda.is_available() and info.get("cuda_kernels"))
    ):
        print(f"needs pyfast's kernels for {dev} (and a device): {info}", file=sys.stderr)
        return 2
    ops, ok = torch.ops.pyfast, True
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen).to(dev, dtype)

    # fused_adamw_ with a per-row mask, a per-element mask, a 0-dim param and a clip scale.
    shapes = [(33, 7), (1000,), (), (5, 3)]
    masks = [
        (torch.rand(33, generator=gen) < 0.5).to(dev),
        (torch.rand(1000, generator=gen) < 0.5).to(dev),
        None,
        None,
    ]
    for dtype in (torch.float32, torch.bfloat16):
        p = [rand(*s, dtype=dtype) for s in shapes]
        g = [rand(*s, dtype=dtype) for s in shapes]
        m = [rand(*s).abs() for s in shapes]
        v = [rand(*s).abs() for s in shapes]
        scale = torch.tensor(0.5, device=dev)
        want = [[t.clone() for t in x] for x in (p, m, v)]
        reference.fused_adamw_(
            *want[:1], g, *want[1:], masks, 1e-3, 0.9, 0.999, 1e-8, 0.01, 3, scale
        )
        ops.fused_adamw_(p, g, m, v, masks, 1e-3, 0.9, 0.999, 1e-8, 0.01, 3, scale)
        ok &= _close(f"fused_adamw_ {dtype}", p + m + v, want[0] + want[1] + want[2], 1e-2, 1e-2)
        norms = [ops.grad_norm(g, masks)], [reference.grad_norm(g, masks)]
        ok &= _close(f"grad_norm {dtype}", *norms, 1e-3, 1e-3)
        gm = [t.clone() for t in g]
        ops.grad_mask_(gm, masks)
        ref = [t.clone() for t in g]
        reference.grad_mask_(ref, masks)
        ok &= _close(f"grad_mask_ {dtype}", gm, ref, 0, 0)

    # token_logprobs: odd vocabulary, ignored rows, bf16; backward through logprobs and lse.
    n, vocab, dim = 37, 5003, 72
    labels = torch.randint(0, vocab, (n,), generator=gen).to(dev)
    labels[::5] = -100
    for dtype in (torch.float32, torch.bfloat16):
        logits = rand(n, vocab, dtype=dtype)
        got = ops.token_logprobs(logits, labels, -100)
        want = reference.token_logprobs(logits, labels, -100)
        ok &= _close(f"token_logprobs {dtype}", [got[0], got[2]], [want[0], want[2]], 1e-4, 1e-4)
        gl, gs = rand(n), rand(n)
        grad = ops.token_logprobs_backward(gl, gs, logits, labels, got[2], -100)
        x = logits.detach().float().requires_grad_()
        lp, _, lse = reference.token_logprobs(x, labels, -100)
        (lp * gl + lse * gs).sum().backward()
        ok &= _close(f"token_logprobs_backward {dtype}", [grad], [x.grad], 1e-2, 1e-3)

    # linear_token_logprobs with a bias: forward, backward and the fused with-grad path.
    hidden, weight, bias = rand(n, dim), rand(vocab, dim) / dim**0.5, rand(vocab)
    got = ops.linear_token_logprobs(hidden, weight, labels, bias, -100)
    want = reference.linear_token_logprobs(hidden, weight, labels, bias, -100)
    ok &= _close("linear_token_logprobs", [got[0], got[2]], [want[0], want[2]], 1e-4, 1e-4)
    gl = rand(n)
    grads = ops.linear_token_logprobs_backward(gl, None, hidden, weight, labels, bias, got[2], -100)
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    (reference.linear_token_logprobs(h, w, labels, b, -100)[0] * gl).sum().backward()
    ok &= _close("linear_token_logprobs_backward", grads, [h.grad, w.grad, b.grad], 1e-3, 1e-4)
    fused = ops.linear_token_logprobs_with_grad(hidden, weight, labels, bias, -100, gl)
    ok &= _close("linear_token_logprobs_with_grad", fused[3:], [h.grad, w.grad, b.grad], 1e-3, 1e-4)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print("all CUDA kernels match their references" if ok else "MISMATCHES above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
