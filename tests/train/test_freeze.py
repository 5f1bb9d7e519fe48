"""Freezing policies: what trains, masks for embedding rows, LoRA (PEFT) and a scalar head."""

from __future__ import annotations

import pytest
import torch

from pyfast.train import Recipe, load_config
from pyfast.train.config import FreezeConfig, LoraConfig
from pyfast.train.freeze import apply_freeze


@pytest.fixture
def model(tiny_train_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_train_dir)


def _trainable(plan):
    return {n for n, _ in plan.params}


def test_full_fine_tuning(model):
    plan = apply_freeze(model, FreezeConfig())
    assert plan.trainable == plan.total == sum(p.numel() for p in model.parameters())
    assert "full fine-tuning" in plan.summary()


def test_top_blocks_norm_and_head(model):
    plan = apply_freeze(model, FreezeConfig(top_blocks=1, norm=True))
    names = _trainable(plan)
    assert names and all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in names)
    assert "model.norm.weight" in names
    assert plan.trainable == sum(p.numel() for _, p in plan.params) < plan.total
    assert not model.model.layers[0].self_attn.q_proj.weight.requires_grad
    plan = apply_freeze(model, FreezeConfig(head=True))
    assert _trainable(plan) == {"model.embed_tokens.weight"}  # the head is tied to it
    assert "tied" in plan.description


def test_patterns_and_errors(model):
    plan = apply_freeze(model, FreezeConfig(patterns=["*.mlp.*"]))
    assert _trainable(plan) and all(".mlp." in n for n in _trainable(plan))
    with pytest.raises(ValueError, match=r"freeze\.patterns: '\*\.nothing' matches no parameter"):
        apply_freeze(model, FreezeConfig(patterns=["*.nothing"]))
    with pytest.raises(ValueError, match=r"freeze\.top_blocks=5 but the model has 2 blocks"):
        apply_freeze(model, FreezeConfig(top_blocks=5))
    with pytest.raises(ValueError, match=r"freeze\.embedding_rows: rows must be in \[0, "):
        apply_freeze(model, FreezeConfig(embedding_rows=[100000]))


@pytest.mark.parametrize("optim", ["fused_adamw", "torch_adamw"])
def test_embedding_rows_only_those_rows_change(base_overrides, optim):
    rows = [3, 7, 250]
    cfg = load_config(
        None,
        [
            *base_overrides,
            "freeze.embedding_rows=[3,7,250]",
            f"optim.name={optim}",
            "optim.weight_decay=0.1",
            "max_steps=2",
            "eval.every=0",
            "save_final=false",
        ],
    )
    recipe = Recipe(cfg)
    recipe.setup()
    emb = recipe.model.get_input_embeddings().weight
    before = emb.detach().clone()
    others = [p.detach().clone() for n, p in recipe.model.named_parameters() if "embed" not in n]
    assert recipe.plan.masks[emb].sum() == 3
    assert recipe.plan.trainable == 3 * emb.shape[1]
    recipe.train()
    changed = (emb.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == rows
    after = [p for n, p in recipe.model.named_parameters() if "embed" not in n]
    assert all(torch.equal(a, b) for a, b in zip(others, after, strict=True))


def test_lora_saves_peft_format_and_merges(base_overrides, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    over = [
        *base_overrides,
        "freeze.lora.enabled=true",
        "freeze.lora.r=4",
        "max_steps=2",
        "eval.every=0",
        "optim.lr=5e-2",
    ]
    recipe = Recipe(load_config(None, over))
    summary = recipe.run()
    assert recipe.padding_free  # the PEFT-wrapped body passes the per-row attention through
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").is_file() and (
        final / "adapter_config.json"
    ).is_file()
    assert summary["trainable_parameters"] < summary["total_parameters"] / 4
    cfg = load_config(None, over)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name)
    lora = PeftModel.from_pretrained(base, final)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = lora(ids).logits
    over_merge = [*over, "freeze.lora.merge=true", f"output_dir={tmp_path / 'merged'}"]
    Recipe(load_config(None, over_merge)).run()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "final")
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_lora_unknown_target(model):
    cfg = FreezeConfig(lora=LoraConfig(enabled=True, target_modules=["qq_proj"]))
    with pytest.raises(ValueError, match=r"target_modules: \['qq_proj'\] match no module"):
        apply_freeze(model, cfg)


def test_new_scalar_head(model):
    plan = apply_freeze(model, FreezeConfig(new_head="scalar"))
    assert _trainable(plan) == {"score_head.weight", "score_head.bias"}
    assert model.score_head.out_features == 1
    assert plan.trainable == model.config.hidden_size + 1


def test_scalar_head_round_trips_through_a_checkpoint(model, tiny_train_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from pyfast.train import checkpoint as ckpt

    apply_freeze(model, FreezeConfig(new_head="scalar"))
    with torch.no_grad():
        model.score_head.bias.fill_(0.25)
    ckpt.save_model(model, None, tmp_path / "m")
    fresh = AutoModelForCausalLM.from_pretrained(tiny_train_dir)
    apply_freeze(fresh, FreezeConfig(new_head="scalar"))
    ckpt.load_weights_into(fresh, tmp_path / "m")
    torch.testing.assert_close(fresh.score_head.weight, model.score_head.weight)
    assert float(fresh.score_head.bias) == 0.25
