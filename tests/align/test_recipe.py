"""pyfast align end to end on a tiny model: learning, every method, resume, eval, bad configs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from pyfast.align.config import load_config
from pyfast.align.recipe import AlignRecipe
from pyfast.cli import main
from tests.align.conftest import make_tiny_llama
from tests.train.conftest import free_port, spawn_ranks, torchrun_env

BENCH_DATA = Path(__file__).parents[1] / "data" / "benchmarks"
NOUNS = ["cat", "house", "plan", "idea", "car", "song", "book", "friend", "meal", "day", "job",
         "game", "dog", "tree", "road", "city", "phone", "movie", "gift", "story"]  # fmt: skip


def synthetic_pairs(path: Path, n: int, seed: int) -> Path:
    """Learnable preferences: answer ' yes' to '<noun> is good' and ' no' to '<noun> is bad'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        good = rng.random() < 0.5
        noun = rng.choice(NOUNS)
        right, wrong = (" yes", " no") if good else (" no", " yes")
        rows.append({"prompt": f"Is the {noun} {'good' if good else 'bad'}? Answer:",
                     "chosen": right, "rejected": wrong})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_align_llama")
    make_tiny_llama(len(tokenizer)).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def overrides(tiny_dir, tmp_path):
    train = synthetic_pairs(tmp_path / "train.jsonl", 64, seed=1)
    held = synthetic_pairs(tmp_path / "held.jsonl", 32, seed=2)
    return [
        f"model.name={tiny_dir}",
        f"data.path={train}",
        f"data.eval_path={held}",
        "data.max_length=32",
        "align.max_prompt_length=24",
        f"align.reference_cache={tmp_path / 'refcache'}",
        "batch_size=8",
        "max_steps=12",
        "optim.lr=3e-2",
        "optim.schedule=constant",
        "align.beta=0.5",
        "threads=1",  # tiny matmuls: one thread is much faster on a shared CPU
        "progress=false",
        "eval.every=6",
        "eval.batch_size=16",
        f"output_dir={tmp_path / 'run'}",
    ]


def run(overrides, *extra, resume=None):
    cfg = load_config(None, [*overrides, *extra])
    return AlignRecipe(cfg, resume=resume).run(), cfg


def history(cfg) -> list[dict]:
    text = (Path(cfg.output_dir) / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(x) for x in text.splitlines()]


def test_dpo_raises_heldout_preference_accuracy(overrides, capsys):
    summary, cfg = run(overrides)
    before, after = summary["heldout"]["before"], summary["heldout"]["after"]
    assert before["step"] == 0 and after["step"] == 12
    # policy == reference before training: DPO's rewards are 0 up to float noise
    assert abs(before["eval_rewards/margins"]) < 1e-4
    assert after["eval_preference_accuracy"] > before["eval_preference_accuracy"]
    assert after["eval_preference_accuracy"] >= 0.9
    assert after["eval_rewards/accuracies"] >= 0.9
    assert after["eval_loss"] < before["eval_loss"]
    rows = history(cfg)
    step = next(h for h in rows if h.get("step") == 1)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected"):  # fmt: skip
        assert key in step and f"eval_{key}" in rows[-1]
    out = Path(cfg.output_dir)
    assert (out / "preference_metrics.png").is_file() and (out / "loss_curve.png").is_file()
    assert (out / "final" / "config.json").is_file()
    assert "reference log-probs of 64 pairs computed" in capsys.readouterr().out
    # a second run reads the cached reference log-probs
    run(overrides, "max_steps=1", "eval.every=0", f"output_dir={out.parent / 'again'}")
    assert "reference log-probs of 64 pairs read from" in capsys.readouterr().out


@pytest.mark.parametrize(
    "method_overrides",
    [
        ["align.method=dpo", "align.loss_type=ipo"],
        ["align.method=dpo", "align.loss_type=hinge", "align.beta=0.1"],
        ["align.method=dpo", "align.label_smoothing=0.1"],
        ["align.method=dpo", "model.gradient_checkpointing=true"],  # concatenated layout
        ["align.method=dpo", "freeze.lora.enabled=true", "freeze.lora.merge=true"],
        ["align.method=simpo", "align.beta=2.0", "align.gamma=0.5"],
        ["align.method=orpo", "align.beta=1.0", "optim.lr=1e-2"],
        ["align.method=reward", "freeze.new_head=scalar", "freeze.patterns=['*']"],
    ],
)
def test_every_method_learns_the_pairs(overrides, method_overrides):
    summary, cfg = run(overrides, *method_overrides, "eval.every=0")
    before, after = summary["heldout"]["before"], summary["heldout"]["after"]
    assert after["eval_loss"] < before["eval_loss"]
    # 32 held-out pairs; 12 steps at lr 3e-2 on a random model amplify float rounding, so the
    # bar sits a few pairs below what each method typically reaches (0.78-1.0)
    assert after["eval_preference_accuracy"] > max(before["eval_preference_accuracy"], 0.75)
    final = Path(cfg.output_dir) / "final"
    if cfg.align.method == "reward":
        assert (final / "score_head.safetensors").is_file()
    if cfg.freeze.lora.enabled:  # merged: an ordinary model folder that pyfast eval loads
        assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()


def _align_worker(rank: int, world: int, port: int, overrides: list[str]) -> None:
    torchrun_env(rank, world, port)
    AlignRecipe(load_config(None, overrides)).run()


def test_fsdp_dpo_with_lora_matches_one_process(overrides, tmp_path):
    """2 FSDP ranks (gloo) of DPO with LoRA adapters: the same curve, held-out preference
    metrics and saved adapter as one process at the same global batch."""
    from safetensors.torch import load_file

    common = [*overrides, "max_steps=4", "eval.every=2", "freeze.lora.enabled=true"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(common, f"output_dir={one}")
    spawn_ranks(
        _align_worker,
        free_port(),
        [*common, "batch_size=4", "distributed=fsdp", f"output_dir={two}"],
    )
    h1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in h1] == [h["step"] for h in h2] == [0, 1, 2, 3, 4]
    for a, b in zip(h1, h2, strict=True):
        for key in ("loss", "grad_norm", "eval_loss", "eval_preference_accuracy"):
            assert (key in a) == (key in b)
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    got = load_file(str(two / "final" / "adapter_model.safetensors"))
    want = load_file(str(one / "final" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and got
    for name, value in got.items():
        assert torch.allclose(value, want[name], rtol=1e-4, atol=1e-5), name


def test_resume_continues_the_same_curve(overrides):
    common = ["max_steps=6", "save_every=3", "eval.every=0", "keep_checkpoints=3"]
    run(overrides, *common)
    first = {h["step"]: h for h in history(load_config(None, [*overrides, *common]))}
    cfg = load_config(None, [*overrides, *common])
    ckpt = Path(cfg.output_dir) / "checkpoints" / "step-000003"
    assert ckpt.is_dir()
    run(overrides, *common, resume=ckpt)
    again = {h["step"]: h for h in history(cfg)}
    for step in (4, 5, 6):
        assert again[step]["loss"] == pytest.approx(first[step]["loss"], rel=1e-5)
        assert again[step]["rewards/margins"] == pytest.approx(
            first[step]["rewards/margins"], rel=1e-4, abs=1e-6
        )


def test_cli_align_then_eval_the_aligned_model(overrides, tmp_path, capsys):
    assert main(["align", *overrides, "max_steps=2", "eval.every=0"]) == 0
    out = capsys.readouterr().out
    assert "held-out preference accuracy:" in out and "done: 2 steps (dpo)" in out
    final = tmp_path / "run" / "final"
    code = main(["eval", "--model", str(final), "--tasks", "arc_easy", "--limit", "4",
                 "--data-dir", str(BENCH_DATA), "--split", "validation"])  # fmt: skip
    assert code == 0
    assert "arc_easy" in capsys.readouterr().out


@pytest.mark.parametrize(
    "bad, message",
    [
        (["align.method=kto"], "align.method: 'kto' is not one of"),
        (["align.loss_type=ipo", "align.label_smoothing=0.1"], "label_smoothing applies to"),
        (["align.method=reward"], "set freeze.new_head=scalar"),
        (["align.max_prompt_length=64"], "max_prompt_length must be in"),
        (["align.bta=0.1"], "did you mean align.beta"),
        (["data.format=chat"], "data.format does not apply"),
    ],
)
def test_bad_configs_exit_with_one_line(overrides, bad, message, capsys):
    assert main(["align", *overrides, *bad]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_only_bad_pairs_is_an_error(overrides, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": " a", "rejected": " a"}) + "\n")
    assert main(["align", *overrides, f"data.path={bad}"]) == 2
    assert "no usable training pairs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[2] / "configs" / "align").glob("*.yaml")), ids=str
)
def test_shipped_configs_load_and_start_with_their_command(path):
    cfg = load_config(path)
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# pyfast align") and f"--config configs/align/{path.name}" in first
    assert all(Path(p).is_file() for p in cfg.data.path)  # run from the repository root
