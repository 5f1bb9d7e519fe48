"""fused_adamw_, grad_norm and FusedAdamW against torch.optim.AdamW and the reference twins."""

import copy
import re

import pytest
import torch

import pyfast
from pyfast.ops import fused_adamw_, grad_norm, reference
from pyfast.optim import FusedAdamW
from tests.conftest import devices

# 0-dim, 1-element, odd-sized, SIMD-width-straddling and multi-dim tensors.
SHAPES = [(), (1,), (17,), (33, 65), (5, 3, 7), (1000,)]


def make_params(shapes, dtype=torch.float32, device="cpu"):
    return [torch.randn(s, dtype=dtype, device=device, requires_grad=True) for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(step, *param_lists):
    gen = torch.Generator().manual_seed(1000 + step)
    for ps in zip(*param_lists, strict=True):
        g = torch.randn(ps[0].shape, generator=gen).to(ps[0].dtype)
        for p in ps:
            p.grad = g.to(p.device).clone()


def groups(params, wd_on):
    half = len(params) // 2
    return [
        {"params": params[:half], "lr": 1e-2, "weight_decay": 0.1 if wd_on else 0.0},
        {
            "params": params[half:],
            "lr": 3e-3,
            "betas": (0.8, 0.99),
            "eps": 1e-6,
            "weight_decay": 0.0,
        },
    ]


def assert_params_close(a, b, **tol):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.detach().cpu(), y.detach().cpu(), **tol)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("wd_on", [True, False])
def test_matches_torch_adamw_fp32(device, wd_on):
    ours = make_params(SHAPES, device=device)
    theirs = clone_params(ours)
    opt = FusedAdamW(groups(ours, wd_on))
    ref = torch.optim.AdamW(groups(theirs, wd_on), foreach=False)
    for step in range(12):
        set_grads(step, ours, theirs)
        opt.step()
        ref.step()
    assert_params_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for p, q in zip(ours, theirs, strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-5, atol=1e-7)
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"]) == 12


@pytest.mark.parametrize("device", devices())
def test_bf16_params(device):
    """bf16 params: equal to the reference twin (fp32 math) up to one bf16 rounding, and close to
    torch.optim.AdamW, whose bf16 state rounds every intermediate."""
    ours = make_params(SHAPES, dtype=torch.bfloat16, device=device)
    twin = clone_params(ours)
    theirs = clone_params(ours)
    opt = FusedAdamW(ours, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    twin_state = [(torch.zeros_like(p).float(), torch.zeros_like(p).float()) for p in twin]
    for step in range(10):
        set_grads(step, ours, theirs, twin)
        opt.step()
        ref.step()
        with torch.no_grad():
            reference.fused_adamw_(
                twin,
                [p.grad for p in twin],
                [s[0] for s in twin_state],
                [s[1] for s in twin_state],
                [],
                1e-2,
                0.9,
                0.999,
                1e-8,
                0.1,
                step + 1,
            )
    assert all(p.dtype == torch.bfloat16 for p in ours)
    assert_params_close(ours, twin, rtol=8e-3, atol=8e-3)
    # torch rounds each intermediate to bf16, so elements drift apart by a few bf16 ulps.
    for x, y in zip(ours, theirs, strict=True):
        rel = (x.float() - y.float()).abs() / (y.float().abs() + 1e-2)
        assert rel.mean() < 2e-2  # about 2.5 bf16 ulps


@pytest.mark.parametrize("device", devices())
def test_clipping_equals_clip_grad_norm_then_adamw(device):
    ours = make_params(SHAPES, device=device)
    theirs = clone_params(ours)
    opt = FusedAdamW(ours, lr=1e-2, max_grad_norm=0.5)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for step in range(10):
        set_grads(step, ours, theirs)
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(theirs, 0.5, foreach=False)
        ref.step()
        torch.testing.assert_close(opt.last_grad_norm.cpu(), norm.cpu(), rtol=1e-5, atol=1e-6)
    assert_params_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_masked_entries_bit_identical(device, state_dtype):
    emb = torch.randn(50, 24, device=device, requires_grad=True)  # per-row mask
    lin = torch.randn(37, 19, device=device, requires_grad=True)  # per-element mask
    bias = torch.randn(19, device=device, requires_grad=True)  # unmasked
    row_mask = torch.rand(50, device=device) < 0.3
    elem_mask = torch.rand(37, 19, device=device) < 0.5
    opt = FusedAdamW(
        [emb, lin, bias],
        lr=1e-2,
        weight_decay=0.1,
        max_grad_norm=1.0,
        masks={emb: row_mask, lin: elem_mask},
        state_dtype=state_dtype,
    )
    # A first step with everything trainable gives the moments of frozen entries non-zero values.
    opt.set_masks({})
    set_grads(0, [emb, lin, bias])
    opt.step()
    opt.set_masks({emb: row_mask, lin: elem_mask})
    before = [t.detach().clone() for t in (emb, lin)]
    state_before = [{k: v.clone() for k, v in opt.state[t].items()} for t in (emb, lin)]
    for step in range(1, 6):
        set_grads(step, [emb, lin, bias])
        opt.step()
    frozen = [~row_mask, ~elem_mask]
    for t, b, s, f in zip((emb, lin), before, state_before, frozen, strict=True):
        assert torch.equal(t.detach()[f], b[f])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[t][key][f], s[key][f])
        assert not torch.equal(t.detach()[~f], b[~f]), "trainable entries must move"


@pytest.mark.parametrize("device", devices())
def test_masked_update_matches_reference(device):
    p = torch.randn(64, 40, device=device)
    masks_row = [torch.rand(64, device=device) < 0.2]
    masks_elem = [torch.rand(64, 40, device=device) < 0.7]
    for masks in (masks_row, masks_elem):
        ours = [p.clone()]
        twin = [p.clone()]
        g = [torch.randn_like(p)]
        st_o = ([torch.rand_like(p)], [torch.rand_like(p)])
        st_t = ([st_o[0][0].clone()], [st_o[1][0].clone()])
        scale = torch.tensor(0.25, device=device)
        fused_adamw_(ours, g, *st_o, masks, 1e-2, 0.9, 0.999, 1e-8, 0.05, 3, scale)
        reference.fused_adamw_(twin, g, *st_t, masks, 1e-2, 0.9, 0.999, 1e-8, 0.05, 3, scale)
        torch.testing.assert_close(ours[0], twin[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(st_o[0][0], st_t[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(st_o[1][0], st_t[1][0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", devices())
def test_grad_norm_matches_reference(device):
    ts = [torch.randn(s, device=device) for s in SHAPES] + [
        torch.randn(3, 5, device=device, dtype=torch.bfloat16)
    ]
    masks = [None] * len(ts)
    masks[3] = torch.rand(33, device=device) < 0.5
    masks[4] = torch.rand(5, 3, 7, device=device) < 0.5
    for m in ([], masks):
        got = grad_norm(ts, m)
        assert got.shape == () and got.dtype == torch.float32 and got.device.type == device
        torch.testing.assert_close(got, reference.grad_norm(ts, m).to(device), rtol=1e-6, atol=0)
    assert float(grad_norm([torch.zeros(0, device=device)], [])) == 0.0


@pytest.mark.parametrize("device", devices())
def test_bf16_state_close_to_fp32_state(device):
    a = make_params([(256, 64), (64,)], device=device)
    b = clone_params(a)
    opt_a = FusedAdamW(a, lr=1e-3)
    opt_b = FusedAdamW(b, lr=1e-3, state_dtype=torch.bfloat16)
    for step in range(20):
        set_grads(step, a, b)
        opt_a.step()
        opt_b.step()
    assert opt_b.state[b[0]]["exp_avg"].dtype == torch.bfloat16
    for x, y, x0 in zip(a, b, clone_params(a), strict=True):
        # Trade-off documented in FusedAdamW: the update differs by well under 1% of its size.
        torch.testing.assert_close(x, y, rtol=0, atol=2e-4)
        del x0


def test_state_dict_round_trip_with_torch_adamw():
    ours = make_params(SHAPES)
    theirs = clone_params(ours)
    opt = FusedAdamW(groups(ours, True))
    for step in range(3):
        set_grads(step, ours)
        opt.step()
    # FusedAdamW -> torch.optim.AdamW, continue both, compare.
    for p, q in zip(ours, theirs, strict=True):
        q.data.copy_(p.data)
    ref = torch.optim.AdamW(groups(theirs, True), foreach=False)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if saved to disk
    for step in range(3, 6):
        set_grads(step, ours, theirs)
        opt.step()
        ref.step()
    assert_params_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # torch.optim.AdamW -> FusedAdamW.
    again = clone_params(theirs)
    opt2 = FusedAdamW(groups(again, True))
    opt2.load_state_dict(copy.deepcopy(ref.state_dict()))
    for step in range(6, 9):
        set_grads(step, again, theirs)
        opt2.step()
        ref.step()
    assert_params_close(again, theirs, rtol=1e-5, atol=1e-6)
    assert opt2.param_groups[1]["betas"] == (0.8, 0.99)


def test_lr_scheduler_drives_fused_adamw():
    p = make_params([(10,)])
    opt = FusedAdamW(p, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    for step in range(3):
        set_grads(step, p)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)


def test_param_without_grad_is_skipped():
    a, b = make_params([(4,), (4,)])
    opt = FusedAdamW([a, b])
    b0 = b.detach().clone()
    a.grad = torch.ones(4)
    opt.step()
    assert torch.equal(b.detach(), b0) and b not in opt.state


@pytest.mark.parametrize("device", devices())
def test_cached_plan_follows_every_change(device):
    """step() reuses the lists it handed the kernel (a plan per group) only while they are
    still right: params that gain or lose a gradient, a state_dict loaded mid-run, a new param
    group, new masks, a changed lr, clipping. Each step is checked against torch.optim.AdamW
    (steps, params, moments); the plan must never leave a param out or update a stale state."""
    ours = make_params(SHAPES, device=device)
    theirs = clone_params(ours)
    opt = FusedAdamW(groups(ours, True))
    ref = torch.optim.AdamW(groups(theirs, True), foreach=False)

    def check():
        assert_params_close(ours, theirs, rtol=1e-5, atol=1e-6)
        for p, q in zip(ours, theirs, strict=True):
            assert (p in opt.state) == (q in ref.state)
            if p in opt.state:
                assert float(opt.state[p]["step"]) == float(ref.state[q]["step"])
                torch.testing.assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"])

    def step(n, skip=()):
        set_grads(n, ours, theirs)
        for i in skip:
            ours[i].grad = theirs[i].grad = None
        opt.step()
        ref.step()
        check()

    step(0, skip=(1,))  # param 1 has no state yet
    step(1)  # ... and joins (new state: the plan is rebuilt)
    step(2)  # the cached plan: param 1's count is one behind (a kernel call of its own)
    assert len(opt._plans) == 2 and len(opt._plans[id(opt.param_groups[0])].calls) == 2
    step(3, skip=(4,))  # a param without gradient is left alone
    for g, h in zip(opt.param_groups, ref.param_groups, strict=True):
        g["lr"] = h["lr"] = g["lr"] * 0.5  # read at every step
    step(4)
    saved = [copy.deepcopy(o.state_dict()) for o in (opt, ref)]
    kept = [p.detach().clone() for p in ours]
    assert saved[0]["state"][0]["step"] == 5
    step(5)
    opt.load_state_dict(saved[0])  # back to step 5: the plan and its counters start over
    ref.load_state_dict(saved[1])
    for p, q, k in zip(ours, theirs, kept, strict=True):
        p.data.copy_(k)
        q.data.copy_(k)
    step(6)
    assert float(opt.state[ours[0]]["step"]) == 6 and saved[0]["state"][0]["step"] == 5
    opt.set_masks({ours[3]: torch.ones(ours[3].shape[0], dtype=torch.bool, device=device)})
    step(7)  # all-true masks: the same update as no masks
    extra = make_params([(9,)], device=device)[0]
    extra_ref = extra.detach().clone().requires_grad_()
    opt.add_param_group({"params": [extra], "lr": 1e-2})
    ref.add_param_group({"params": [extra_ref], "lr": 1e-2})
    ours.append(extra)
    theirs.append(extra_ref)
    step(8)
    step(9)
    clipped = FusedAdamW(clone_params(ours), lr=1e-2, max_grad_norm=0.5)
    twin = torch.optim.AdamW(clone_params(ours), lr=1e-2, foreach=False)
    for n in range(3):
        set_grads(n, list(clipped.param_groups[0]["params"]), list(twin.param_groups[0]["params"]))
        clipped.step()
        torch.nn.utils.clip_grad_norm_(twin.param_groups[0]["params"], 0.5)
        twin.step()
    assert_params_close(clipped.param_groups[0]["params"], twin.param_groups[0]["params"],
                        rtol=1e-5, atol=1e-6)  # fmt: skip


def _op_args(device="cpu", n=3):
    params = [torch.randn(7, 5, device=device) for _ in range(n)]
    grads = [torch.randn_like(p) for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    return params, grads, m, v


@pytest.mark.skipif(not pyfast.HAS_C, reason="compiled extension not available")
def test_opcheck():
    params, grads, m, v = _op_args()
    masks = [torch.ones(7, dtype=torch.bool), None, torch.rand(7, 5) < 0.5]
    torch.library.opcheck(
        torch.ops.pyfast.fused_adamw_,
        (params, grads, m, v, masks, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1, torch.tensor(0.5)),
    )
    torch.library.opcheck(torch.ops.pyfast.grad_norm, (grads, masks))
    torch.library.opcheck(torch.ops.pyfast.grad_mask_, (grads, masks))


@pytest.mark.skipif(not pyfast.HAS_C, reason="compiled extension not available")
def _set(lst, i, value):
    lst[i] = value


# (argument list index, mutation, expected message prefix) — args = [params, grads, m, v, masks]
BAD_ARGS = [
    (lambda a: a[1].pop(), "grads must have 3 entries"),
    (lambda a: a[3].pop(), "exp_avg_sqs must have 3 entries"),
    (lambda a: a[4].append(None), "masks must have 3 entries"),
    (lambda a: _set(a[1], 1, a[1][1].double()), "grads[1] has dtype Double"),
    (lambda a: _set(a[0], 0, a[0][0].half()), "params[0] must be float32 or bfloat16"),
    (lambda a: _set(a[2], 2, torch.zeros(3, 3)), "exp_avgs[2] has shape"),
    (
        lambda a: _set(a[2], 0, a[2][0].bfloat16()),
        "exp_avgs[0] and exp_avg_sqs[0] must both have dtype BFloat16",
    ),
    (
        lambda a: a[4].extend([torch.ones(3, dtype=torch.bool), None, None]),
        "masks[0] must have the param's shape",
    ),
    (lambda a: _set(a[1], 0, torch.randn(5, 7).t()), "grads[0] must be contiguous"),
]


@pytest.mark.skipif(not pyfast.HAS_C, reason="compiled extension not available")
@pytest.mark.parametrize("mutate, message", BAD_ARGS)
def test_bad_arguments_name_the_argument(mutate, message):
    params, grads, m, v = _op_args()
    args = [params, grads, m, v, []]
    mutate(args)
    with pytest.raises(RuntimeError, match=re.escape("fused_adamw_: " + message)):
        torch.ops.pyfast.fused_adamw_(*args, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1)


@pytest.mark.skipif(not pyfast.HAS_C, reason="compiled extension not available")
def test_bad_hyper_parameters():
    params, grads, m, v = _op_args()
    with pytest.raises(RuntimeError, match="fused_adamw_: beta1 must be in"):
        torch.ops.pyfast.fused_adamw_(params, grads, m, v, [], 1e-3, 1.0, 0.999, 1e-8, 0.0, 1)
    with pytest.raises(RuntimeError, match="fused_adamw_: step must be >= 1"):
        torch.ops.pyfast.fused_adamw_(params, grads, m, v, [], 1e-3, 0.9, 0.999, 1e-8, 0.0, 0)
    with pytest.raises(ValueError, match="FusedAdamW: mask of shape"):
        FusedAdamW(params, masks={params[0]: torch.ones(5, dtype=torch.bool)})
    with pytest.raises(ValueError, match="FusedAdamW: lr must be >= 0"):
        FusedAdamW(params, lr=-1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cpu_and_cuda_agree():
    assert pyfast.HAS_CUDA_KERNELS, "a CUDA device exists but pyfast was built without CUDA"
    for dtype, state_dtype in [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
    ]:
        cpu = make_params(SHAPES + [(3000, 129)], dtype=dtype)
        gpu = [p.detach().cuda().requires_grad_() for p in cpu]
        masks_cpu = {cpu[3]: torch.rand(33) < 0.5, cpu[-1]: torch.rand(3000, 129) < 0.5}
        masks_gpu = {gpu[3]: masks_cpu[cpu[3]].cuda(), gpu[-1]: masks_cpu[cpu[-1]].cuda()}
        o1 = FusedAdamW(cpu, lr=1e-2, max_grad_norm=1.0, masks=masks_cpu, state_dtype=state_dtype)
        o2 = FusedAdamW(gpu, lr=1e-2, max_grad_norm=1.0, masks=masks_gpu, state_dtype=state_dtype)
        for step in range(5):
            set_grads(step, cpu, gpu)
            o1.step()
            o2.step()
        # The clip coefficient comes from a global norm summed in a different order on each
        # device; measured on an H200: 2 of 387,000 fp32 entries differ, by at most 2.2e-5.
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        assert_params_close(cpu, gpu, **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mixed_devices_rejected():
    params, grads, m, v = _op_args()
    grads[1] = grads[1].cuda()
    with pytest.raises(RuntimeError, match=r"grads\[1\] is on cuda"):
        torch.ops.pyfast.fused_adamw_(params, grads, m, v, [], 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)


def test_update_in_backward_equals_step_and_frees_gradients():
    """Updates inside backward (post-accumulate-grad hooks) give bit-identical params to step(),
    tied weights included, with masks, and leave no gradient behind."""
    import copy

    from tests.conftest import tiny_llama

    a = tiny_llama(64).train()
    b = copy.deepcopy(a)
    a.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a frozen module
    b.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    rows = torch.rand(64) < 0.5  # trainable embedding rows (tied with the head)

    def opt(m):
        params = [p for p in m.parameters() if p.requires_grad]
        return FusedAdamW(params, lr=1e-2, weight_decay=0.1,
                          masks={m.model.embed_tokens.weight: rows})  # fmt: skip

    oa, ob = opt(a), opt(b)
    ob.update_in_backward()
    assert ob.updates_in_backward
    for step in range(3):
        ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(step))
        a(ids, labels=ids).loss.backward()
        oa.step()
        oa.zero_grad()
        b(ids, labels=ids).loss.backward()
        assert all(p.grad is None for p in b.parameters())
        ob.step()  # nothing left to do
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), n
    assert ob.state_dict()["state"].keys() == oa.state_dict()["state"].keys()
    ob.remove_backward_hooks()
    assert not ob.updates_in_backward
    with pytest.raises(ValueError, match=r"update_in_backward: gradient clipping"):
        FusedAdamW(list(a.parameters()), max_grad_norm=1.0).update_in_backward()
