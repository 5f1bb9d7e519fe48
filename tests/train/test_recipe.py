"""The training loop: fused loss, accumulation, checkpoints/resume, stops, outputs, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pyfast.train import Recipe, TrainingStopped, load_config
from pyfast.train import checkpoint as ckpt
from tests.train.conftest import ARC_TRAIN


def _losses(out) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_run_writes_model_metrics_plot_and_learns(base_overrides, tmp_path):
    summary = Recipe(load_config(None, [*base_overrides, "max_steps=8"])).run()
    out = tmp_path / "run"
    losses = _losses(out)
    assert len(losses) == 8 and summary["steps"] == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # lr 1e-2 on 14 examples: it learns
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6, 8]
    assert all(math.isclose(r["eval_ppl"], math.exp(r["eval_loss"])) for r in evals)
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["steps"] == 8
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")  # plain transformers loads it
    assert (out / "best" / "best_metrics.json").is_file()
    assert ckpt.list_checkpoints(out / "checkpoints")[-1].name == "step-000008"
    assert model.config.num_hidden_layers == 2


def test_fused_loss_matches_hf_loss(base_overrides):
    recipe = Recipe(load_config(None, base_overrides))
    recipe.setup()
    batch = recipe.collate(recipe.train_examples[:4])
    loss, _ = recipe.compute_loss(recipe.model, batch)
    ref = recipe.model(**batch).loss
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_accumulation_matches_one_big_batch(base_overrides, tmp_path):
    a = Recipe(load_config(None, [*base_overrides, "eval.every=0", "save_final=false"]))
    a.run()
    b = Recipe(
        load_config(
            None,
            [
                *base_overrides,
                "batch_size=2",
                "grad_accum=2",
                "eval.every=0",
                "save_final=false",
                f"output_dir={tmp_path / 'acc'}",
            ],
        )
    )
    b.run()
    la, lb = [h["loss"] for h in a.history], [h["loss"] for h in b.history]
    assert len(la) == 6
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-4, atol=1e-5)


def test_update_in_backward_matches_step_and_checks_its_limits(base_overrides, tmp_path):
    common = [*base_overrides, "eval.every=0", "save_final=false", "optim.max_grad_norm=null"]
    a = Recipe(load_config(None, common))
    a.run()
    b = Recipe(load_config(None, [*common, "optim.update_in_backward=true",
                                  f"output_dir={tmp_path / 'inbw'}"]))  # fmt: skip
    b.run()
    assert [h["loss"] for h in b.history] == [h["loss"] for h in a.history]
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    for bad, key in [("optim.max_grad_norm=1.0", "optim.max_grad_norm=1.0"),
                     ("grad_accum=2", "grad_accum=2"),
                     ("optim.name=torch_adamw", "optim.name=torch_adamw")]:  # fmt: skip
        r = Recipe(load_config(None, [*common, "optim.update_in_backward=true", bad,
                                      f"output_dir={tmp_path / 'refused'}"]))  # fmt: skip
        with pytest.raises(ValueError, match=rf"update_in_backward=true cannot be used with {key}"):
            r.setup()


def test_resume_reproduces_the_uninterrupted_curve(base_overrides, tmp_path):
    full = Recipe(load_config(None, [*base_overrides, f"output_dir={tmp_path / 'full'}"]))
    full.run()
    part = [*base_overrides, "save_every=3", f"output_dir={tmp_path / 'part'}"]
    first = Recipe(load_config(None, [*part, "max_steps=6"]))
    first.setup()
    for _ in range(3):  # "interrupted" after step 3's checkpoint
        first.record(first.train_step())
    first.save_checkpoint()
    first.cleanup()  # the "killed" run's lock goes with its process
    resumed = Recipe(load_config(None, part), resume="latest")
    resumed.run()
    assert [h["step"] for h in resumed.history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    got = [h["loss"] for h in resumed.history if "loss" in h]  # steps 1-3 kept from metrics.jsonl
    want = [h["loss"] for h in full.history if "loss" in h]
    held = [h["eval_loss"] for h in resumed.history if "eval_loss" in h]
    assert held[-1] == pytest.approx(full.history[-1]["eval_loss"], rel=1e-6)
    assert len(got) == len(want) == 6
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_interrupted_save_keeps_the_previous_checkpoint(base_overrides, tmp_path, monkeypatch):
    recipe = Recipe(load_config(None, [*base_overrides, "eval.every=0"]))
    recipe.setup()
    recipe.train_step()
    good = recipe.save_checkpoint()
    before = sorted(p.name for p in good.iterdir())
    recipe.train_step()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        recipe.save_checkpoint()
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["step-000001"]  # no partial folder left
    assert sorted(p.name for p in good.iterdir()) == before
    assert ckpt.latest_checkpoint(tmp_path / "run") == good
    meta, _ = ckpt.read_state(good)
    assert meta["step"] == 1


def test_nan_loss_stops_and_keeps_the_best(base_overrides, tmp_path):
    class Exploding(Recipe):
        def compute_loss(self, model, batch):
            loss, stats = super().compute_loss(model, batch)
            return (loss * float("nan") if model.training and self.step >= 3 else loss), stats

    recipe = Exploding(load_config(None, [*base_overrides, "eval.every=1"]))
    with pytest.raises(
        TrainingStopped,
        match=r"non-finite training loss \(nan\) at step 4.*"
        r"best checkpoint of step \d kept",
    ):
        recipe.run()
    best = json.loads((tmp_path / "run" / "best" / "best_metrics.json").read_text())
    assert best["step"] <= 3 and math.isfinite(best["eval_loss"])


def test_early_stopping_keeps_the_best(base_overrides, tmp_path):
    losses = iter([5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 3.8])

    class Scripted(Recipe):
        def evaluate_heldout(self):
            return {"eval_loss": next(losses)}

    over = [*base_overrides, "eval.every=1", "eval.early_stopping_patience=2", "max_steps=6"]
    summary = Scripted(load_config(None, over)).run()
    assert summary["steps"] == 4 and summary["best_step"] == 2
    assert "early stopping" in summary["stop_reason"]
    best = json.loads((tmp_path / "run" / "best" / "best_metrics.json").read_text())
    assert best["step"] == 2 and best["eval_loss"] == 3.0


def test_unknown_model_and_small_dataset(base_overrides, tmp_path):
    with pytest.raises(ValueError, match="neither 'default', a .gguf file nor"):
        Recipe(load_config(None, [*base_overrides, f"model.name={tmp_path / 'nope'}"])).setup()
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Recipe(load_config(None, [*base_overrides, "batch_size=64"])).setup()


def test_cli_train_and_eval_of_the_result(base_overrides, tmp_path, capsys):
    from pyfast.cli import main

    assert main(["train", *base_overrides, "max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "done: 2 steps" in out and "trainable parameters" in out
    final = tmp_path / "run" / "final"
    assert f"model in {final}" in out
    # without a final save the closing line does not point at a folder that does not exist
    assert main(["train", *base_overrides, "max_steps=1", "save_final=false", "eval.every=0",
                 f"output_dir={tmp_path / 'nofinal'}"]) == 0  # fmt: skip
    nofinal = capsys.readouterr().out
    assert f"best model in {tmp_path / 'nofinal' / 'best'}" in nofinal
    assert not (tmp_path / "nofinal" / "final").exists()
    assert (
        main(
            [
                "eval",
                "--model",
                str(final),
                "--tasks",
                "arc_easy",
                "--data-dir",
                str(ARC_TRAIN.parents[1]),
                "--split",
                "validation",
                "--limit",
                "2",
            ]
        )
        == 0
    )
    assert "| arc_easy | 2 | acc |" in capsys.readouterr().out
    assert main(["train", "optim.lrr=3"]) == 2
    assert "unknown config key optim.lrr; did you mean optim.lr?" in capsys.readouterr().err
    assert main(["train", *base_overrides, "optim.lr=1e9", "max_steps=6", "--overwrite"]) == 2
    assert "non-finite training loss" in capsys.readouterr().err


def test_bf16_autocast_and_benchmark_tasks_during_training(base_overrides):
    over = [
        *base_overrides,
        "precision=bf16",
        "max_steps=2",
        "eval.every=2",
        "eval.tasks=arc_easy",
        f"eval.tasks_data_dir={ARC_TRAIN.parents[1]}",
        "eval.tasks_split=validation",
        "eval.tasks_limit=2",
        "save_final=false",
    ]
    recipe = Recipe(load_config(None, over))
    recipe.run()
    last = recipe.history[-1]
    assert math.isfinite(last["loss"]) and last["step"] == 2
    assert 0.0 <= last["arc_easy/acc"] <= 1.0 and "arc_easy/acc_norm" in last
    fp32 = Recipe(
        load_config(None, [*base_overrides, "max_steps=1", "eval.every=0"]), overwrite=True
    )
    fp32.setup()
    batch = fp32.collate(fp32.train_examples[:4])
    ref, _ = fp32.compute_loss(fp32.model, batch)
    fp32.cfg.precision = "bf16"
    low, _ = fp32.compute_loss(fp32.model, batch)
    assert low.dtype == torch.float32 and abs(float(low) - float(ref)) < 0.05 * float(ref)


def test_hf_dataset_rows(monkeypatch, tiny_tokenizer):
    import datasets

    from pyfast.train.config import DataConfig
    from pyfast.train.data import load_examples

    rows = [{"prompt": "a", "completion": " b"}, {"prompt": "c"}]
    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(rows[:1]) if config == "ok" else rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    train, _, stats = load_examples(DataConfig(path=["hf:org/set"], hf_config="ok"), tiny_tokenizer)
    assert calls == [("org/set", "ok", "train")] and len(train) == 1
    assert stats["train"]["format"] == "prompt_completion"
    with pytest.raises(ValueError, match=r"hf:org/set\[train\]:row 2: missing field 'completion'"):
        load_examples(DataConfig(path=["org/set"], hf_config="bad"), tiny_tokenizer)


def test_padding_free_batches_match_the_padded_loss_and_gradients(base_overrides):
    """Rows cut after their last target and run end to end (attention within rows): the same
    loss and gradients as the padded batch; rows without targets are left out."""
    from pyfast.train.recipe import causal_lm_hidden, padding_free_hidden, shifted_labels

    recipe = Recipe(load_config(None, base_overrides))
    recipe.setup()
    assert recipe.padding_free  # on by default where the model runs sdpa attention
    batch = recipe.collate(recipe.train_examples[:5])
    batch["labels"][1] = -100  # no targets: not run at all
    n2 = int(batch["attention_mask"][2].sum())
    batch["labels"][2, n2 - 3 :] = -100  # the row is cut before its last three tokens
    model, head = recipe.model, recipe.model.get_output_embeddings().weight
    hidden, targets = padding_free_hidden(
        model, batch["input_ids"], batch["labels"], batch["attention_mask"]
    )
    # a row runs up to the token before its last label: that token predicts it
    last_label = [max((p for p, x in enumerate(row.tolist()) if x != -100), default=0)
                  for row in batch["labels"]]  # fmt: skip
    assert last_label[1] == 0 and last_label[2] <= n2 - 4
    # only positions with a target come back (the last layer's MLP ran only there)
    n_targets = int((shifted_labels(batch["labels"]) != -100).sum())
    assert hidden.shape[0] == targets.shape[0] == n_targets < sum(last_label)
    assert bool((targets != -100).all())
    from pyfast.ops import linear_cross_entropy

    loss = linear_cross_entropy(hidden, head, targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_hidden = causal_lm_hidden(model, batch["input_ids"], batch["attention_mask"])
    ref = linear_cross_entropy(ref_hidden, head, shifted_labels(batch["labels"]))
    torch.testing.assert_close(loss, ref)
    for a, b in zip(grads, torch.autograd.grad(ref, list(model.parameters())), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    no_targets = torch.full_like(batch["labels"], -100)
    assert padding_free_hidden(model, batch["input_ids"], no_targets) is None
    left = batch["attention_mask"].flip(1)  # left padding: the caller runs the padded batch
    assert padding_free_hidden(model, batch["input_ids"], batch["labels"], left) is None


def test_padding_free_run_equals_padded_run_and_fails_loudly(base_overrides, tmp_path):
    runs = {}
    for flag in ("true", "false"):
        r = Recipe(load_config(None, [*base_overrides, "max_steps=3", "eval.every=0",
                                      "save_final=false", f"model.padding_free={flag}",
                                      f"output_dir={tmp_path / flag}"]))  # fmt: skip
        r.run()
        runs[flag] = r
    assert runs["true"].padding_free and not runs["false"].padding_free
    la = torch.tensor([h["loss"] for h in runs["true"].history])
    lb = torch.tensor([h["loss"] for h in runs["false"].history])
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    # a model whose layers never see the per-row attention must not train on a mixed-up row
    recipe = runs["true"]
    body = recipe.model.get_decoder()
    forward = body.forward
    body.forward = lambda *a, pyfast_segments=None, **k: forward(*a, **k)
    try:
        batch = recipe.collate(recipe.train_examples[:2])
        with pytest.raises(RuntimeError, match="padding_free: false"):
            recipe.compute_loss(recipe.model, batch)
    finally:
        del body.forward


def test_frozen_bottom_blocks_run_on_packed_weights(base_overrides, tmp_path, monkeypatch):
    from torch import nn

    from pyfast.ops import packed_linear as pl

    if pl.packing_unavailable() is not None:
        pytest.skip(pl.packing_unavailable())
    monkeypatch.setattr(pl, "_MIN_MACS", 0)  # the tiny model's calls are small: pack them all
    in_training: list[int] = []  # weights packed while gradients were on (training steps)
    stock_weight = pl._Pack.weight

    def weight(self, w):
        if torch.is_grad_enabled():
            in_training.append(w.data_ptr())
        return stock_weight(self, w)

    monkeypatch.setattr(pl._Pack, "weight", weight)
    runs = []
    for on in (False, True):  # model.pack_weights: false is torch's F.linear throughout
        overrides = [*base_overrides, "freeze.top_blocks=1", "eval.every=2", "max_steps=4",
                     "save_final=false", f"model.pack_weights={str(on).lower()}",
                     f"output_dir={tmp_path / str(on)}"]  # fmt: skip
        r = Recipe(load_config(None, overrides))
        r.run()
        runs.append(r)
        assert bool(in_training) == on
    plain, packed = runs
    layers = packed.model.model.layers
    bottom, top = layers[0].mlp.down_proj, layers[-1].mlp.down_proj
    assert not bottom.weight.requires_grad and top.weight.requires_grad
    # the frozen block below the trainable one ran packed in the training steps, the trainable
    # one never did with gradients on
    assert bottom.weight.data_ptr() in in_training and top.weight.data_ptr() not in in_training
    la = [h["loss"] for h in plain.history if "loss" in h]
    lb = [h["loss"] for h in packed.history if "loss" in h]
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-4, atol=1e-5)
    for a, b in zip(plain.model.parameters(), packed.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # the same training
    assert not any("forward" in m.__dict__ for m in packed.model.modules() if type(m) is nn.Linear)
