"""Pair log-probs through the fused head, the reward model, and the reference-log-prob cache."""

from __future__ import annotations

import pytest
import torch

from pyfast.align.data import collate_pairs, collate_shared_prompt, read_pairs, tokenize_pairs
from pyfast.align.logps import pair_logps, pair_rewards
from pyfast.align.reference import model_fingerprint, reference_logps
from tests.align.conftest import PAIRS, make_tiny_llama


@pytest.fixture(scope="module")
def pairs(tokenizer):
    kept, _ = tokenize_pairs(read_pairs(PAIRS)[:12], tokenizer, 160, 120)
    return kept


def naive_logps(model, batch):
    """log_softmax over the full logits, gathered and summed per row (the oracle)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1), mask.sum(-1)


def test_pair_logps_match_full_log_softmax(tiny_model, pairs, tokenizer):
    batch = collate_pairs(pairs[:5], tokenizer.eos_token_id)
    lp = pair_logps(tiny_model, batch)
    want, counts = naive_logps(tiny_model, batch)
    got = torch.cat([lp.chosen, lp.rejected])
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-5)
    assert torch.equal(torch.cat([lp.chosen_tokens, lp.rejected_tokens]), counts)
    ac, _ = lp.averaged()
    assert torch.allclose(ac, lp.chosen / lp.chosen_tokens)


def test_pair_logps_gradient_matches_full_log_softmax(tokenizer, pairs):
    batch = collate_pairs(pairs[:3], tokenizer.eos_token_id)
    a = make_tiny_llama(len(tokenizer), seed=1)
    b = make_tiny_llama(len(tokenizer), seed=1)
    lp = pair_logps(a, batch)
    (lp.chosen.sum() - 0.5 * lp.rejected.sum()).backward()
    want, _ = naive_logps(b, batch)
    n = want.shape[0] // 2
    (want[:n].sum() - 0.5 * want[n:].sum()).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa.grad, pb.grad.to(pa.dtype), atol=1e-5, rtol=1e-3), name


def test_reward_head_scores_last_real_token(tiny_model, pairs, tokenizer):
    from pyfast.train.freeze import add_scalar_head

    with pytest.raises(ValueError, match="no scalar head"):
        pair_rewards(tiny_model, collate_pairs(pairs[:1], tokenizer.eos_token_id))
    head = add_scalar_head(tiny_model)
    batch = collate_pairs(pairs[:4], tokenizer.eos_token_id)
    rc, rr = pair_rewards(tiny_model, batch)
    assert rc.shape == rr.shape == (4,)
    # each reward is the head on that sequence's own last token, scored alone (no padding)
    n = int(batch["attention_mask"][5].sum())
    ids = batch["input_ids"][5, :n].unsqueeze(0)
    hidden = tiny_model.model(input_ids=ids).last_hidden_state[0, -1]
    assert torch.allclose(head(hidden).squeeze(), rr[1], atol=1e-5)
    (rc.sum() - rr.sum()).backward()
    assert head.weight.grad is not None


def test_reference_cache_is_written_once_and_keyed(tiny_model, pairs, tokenizer, tmp_path):
    pad = tokenizer.eos_token_id
    c1, r1, path, cached = reference_logps(tiny_model, pairs, pad, tmp_path, batch_size=5)
    assert not cached and path.is_file() and c1.shape == (len(pairs),)
    want = pair_logps(tiny_model, collate_pairs(pairs, pad))
    assert torch.allclose(c1, want.chosen.detach(), atol=1e-4)
    c2, r2, path2, cached = reference_logps(tiny_model, pairs, pad, tmp_path)
    assert cached and path2 == path and torch.equal(c1, c2) and torch.equal(r1, r2)
    # other data or other weights: another key
    _, _, path3, cached = reference_logps(tiny_model, pairs[:-1], pad, tmp_path)
    assert not cached and path3 != path
    other = make_tiny_llama(len(tokenizer), seed=7)
    assert model_fingerprint(other) != model_fingerprint(tiny_model)


def test_lora_reference_uses_disabled_adapters(tiny_model, pairs, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    pad = tokenizer.eos_token_id
    base_fp = model_fingerprint(tiny_model)
    base_c, base_r = reference_logps(tiny_model, pairs[:4], pad, tmp_path / "base")[:2]
    model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # non-zero adapters, so the policy differs from the base model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    assert model_fingerprint(model) == base_fp  # adapter weights are not part of the identity
    ref_c, ref_r, _, cached = reference_logps(model, pairs[:4], pad, tmp_path / "lora")
    assert not cached
    assert torch.allclose(ref_c, base_c, atol=1e-5) and torch.allclose(ref_r, base_r, atol=1e-5)
    policy = pair_logps(model, collate_pairs(pairs[:4], pad))
    assert not torch.allclose(policy.chosen.detach(), ref_c, atol=1e-3)


@pytest.mark.parametrize("trees", [True, False])
def test_shared_prompt_layout_matches_concatenated(tokenizer, pairs, trees):
    """Prompt once for both answers — as one unpadded row of prompt trees, or with the prompt's
    cache repeated — = the (2B, T) concatenated forward, values and gradients (prompts of
    different lengths, so left padding is exercised)."""
    pad = tokenizer.eos_token_id
    some = pairs[:4]
    assert len({len(p.prompt_ids) for p in some}) > 1
    a = make_tiny_llama(len(tokenizer), seed=3)
    b = make_tiny_llama(len(tokenizer), seed=3)
    shared = pair_logps(a, collate_shared_prompt(some, pad), trees=trees)
    concat = pair_logps(b, collate_pairs(some, pad))
    for x, y in [(shared.chosen, concat.chosen), (shared.rejected, concat.rejected)]:
        assert torch.allclose(x, y, atol=1e-4, rtol=1e-5)
    assert torch.equal(shared.chosen_tokens, concat.chosen_tokens)
    assert torch.equal(shared.rejected_tokens, concat.rejected_tokens)
    (shared.chosen.sum() - 0.3 * shared.rejected.sum()).backward()
    (concat.chosen.sum() - 0.3 * concat.rejected.sum()).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5, rtol=1e-3), name


def test_gradient_checkpointing_refuses_the_shared_prompt_layout(tokenizer, pairs):
    """Checkpointed layers drop the cache: the shared-prompt layout's cache path must refuse,
    not mis-score; its tree path (no cache) and the concatenated layout (what the recipe
    collates under checkpointing) still match."""
    pad = tokenizer.eos_token_id
    model = make_tiny_llama(len(tokenizer), seed=3)
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing disables"):
        pair_logps(model, collate_shared_prompt(pairs[:2], pad), trees=False)
    tree = pair_logps(model, collate_shared_prompt(pairs[:2], pad))
    want = pair_logps(
        make_tiny_llama(len(tokenizer), seed=3).train(), collate_pairs(pairs[:2], pad)
    )
    assert torch.allclose(tree.chosen, want.chosen, atol=1e-4)
    assert torch.allclose(tree.rejected, want.rejected, atol=1e-4)
    plain = make_tiny_llama(len(tokenizer), seed=3).train()
    a = pair_logps(model, collate_pairs(pairs[:2], pad))
    b = pair_logps(plain, collate_pairs(pairs[:2], pad))
    assert torch.allclose(a.chosen, b.chosen, atol=1e-5)
    assert torch.allclose(a.rejected, b.rejected, atol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_reference_pass_on_packed_weights(tiny_model, pairs, tokenizer, monkeypatch, lora):
    from torch import nn

    from pyfast.align.reference import compute_reference_logps
    from pyfast.ops import packed_linear as pl

    if pl.packing_unavailable() is not None:
        pytest.skip(pl.packing_unavailable())
    pad = tokenizer.eos_token_id
    model = tiny_model
    if lora:  # the adapters are off for the reference: the wrapped base layers run packed
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    packed = []
    stock_weight = pl._Pack.weight
    monkeypatch.setattr(
        pl._Pack, "weight", lambda self, w: packed.append(1) or stock_weight(self, w)
    )
    monkeypatch.setattr(pl, "_MIN_MACS", 1 << 62)  # every call stays with torch
    want_c, want_r = compute_reference_logps(model, pairs, pad, batch_size=5)
    assert not packed
    monkeypatch.setattr(pl, "_MIN_MACS", 0)  # the tiny model's calls are small: pack them all
    got_c, got_r = compute_reference_logps(model, pairs, pad, batch_size=5)
    assert packed  # the packed path ran ...
    assert torch.allclose(got_c, want_c, rtol=1e-5, atol=1e-4)  # ... to float32 rounding
    assert torch.allclose(got_r, want_r, rtol=1e-5, atol=1e-4)
    assert not any("forward" in m.__dict__ for m in model.modules() if type(m) is nn.Linear)


def test_reference_pass_progress_counts_every_pair(tiny_model, pairs, tokenizer, monkeypatch):
    """With progress on, the reference pass's bar counts each pair once (same log-probs)."""
    from pyfast.align.reference import compute_reference_logps
    from pyfast.eval import progress

    pad = tokenizer.eos_token_id
    want = compute_reference_logps(tiny_model, pairs, pad, batch_size=3, pack_weights=False)
    counted, enabled = [], []
    real_init = progress._Bar.__init__

    def init(self, total, desc, unit, on):
        enabled.append((total, desc, on))
        real_init(self, total, desc, unit, on)

    monkeypatch.setattr(progress._Bar, "__init__", init)
    monkeypatch.setattr(
        progress._Bar, "tokens_done", lambda self, n, tokens: counted.append((n, tokens))
    )
    got = compute_reference_logps(
        tiny_model, pairs, pad, batch_size=3, pack_weights=False, progress=True
    )
    assert enabled == [(len(pairs), "reference pass", True)]
    assert sum(n for n, _ in counted) == len(pairs) and all(t > 0 for _, t in counted)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
