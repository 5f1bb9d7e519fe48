"""DDP and FSDP on CPU (gloo): 2 processes match one process at the same global batch."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pyfast.cli import main
from pyfast.train import Recipe, load_config
from tests.train.conftest import free_port, spawn_ranks, tiny_run_overrides, torchrun_env

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def _worker(rank: int, world: int, port: int, overrides: list[str]) -> None:
    torchrun_env(rank, world, port)
    Recipe(load_config(None, overrides)).run()


def _fsdp_worker(rank: int, world: int, ports: list[int], overrides: list[str], out) -> None:
    """An FSDP run with a checkpoint at step 3, then --resume from it in the same folder."""
    torchrun_env(rank, world, ports[0])
    Recipe(load_config(None, overrides)).run()
    if rank == 0:
        shutil.copy(out / "metrics.jsonl", out / "uninterrupted.jsonl")
        shutil.copytree(out / "final", out / "uninterrupted_final")
    torchrun_env(rank, world, ports[1])
    Recipe(load_config(None, overrides), resume=out / "checkpoints" / "step-000003").run()


def _history(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _series(history: list[dict], key: str) -> torch.Tensor:
    return torch.tensor([h[key] for h in history if key in h])


@pytest.fixture(scope="module")
def single_run(tiny_train_dir, tmp_path_factory):
    """One process at batch 4 (the reference): its output folder and overrides."""
    out = tmp_path_factory.mktemp("single")
    # 3 held-out examples: 2 ranks split them unevenly
    common = [*tiny_run_overrides(tiny_train_dir, out), "data.eval_fraction=0.3", "save_final=true"]
    Recipe(load_config(None, [*common, "batch_size=4"])).run()
    return out, common


def test_two_ranks_match_one_process(single_run, tmp_path):
    one, common = single_run
    two = tmp_path / "two"
    spawn_ranks(_worker, free_port(), [*common, "batch_size=2", f"output_dir={two}"])
    h1, h2 = _history(one / "metrics.jsonl"), _history(two / "metrics.jsonl")
    assert [h["step"] for h in h1] == [h["step"] for h in h2]
    assert len(_series(h1, "loss")) == 6
    torch.testing.assert_close(_series(h2, "loss"), _series(h1, "loss"), rtol=1e-4, atol=1e-5)
    ev1, ev2 = _series(h1, "eval_loss"), _series(h2, "eval_loss")
    torch.testing.assert_close(ev2, ev1, rtol=1e-4, atol=1e-5)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    assert (two / "final" / "config.json").is_file()


def test_fsdp_matches_one_process_and_resumes(single_run, tmp_path):
    from transformers import AutoModelForCausalLM

    one, common = single_run
    out = tmp_path / "fsdp"
    overrides = [
        *common,
        "distributed=fsdp",
        "batch_size=1",  # x 2 accumulation steps x 2 ranks = the single process's batch 4
        "grad_accum=2",
        "model.gradient_checkpointing=true",
        "save_every=3",
        "eval.batch_size=1",  # held-out batches 2 + 1: rank 1 runs a padding batch
        f"output_dir={out}",
    ]
    spawn_ranks(_fsdp_worker, [free_port(), free_port()], overrides, out)
    h1, h2 = _history(one / "metrics.jsonl"), _history(out / "uninterrupted.jsonl")
    assert [h["step"] for h in h1] == [h["step"] for h in h2]
    assert len(_series(h1, "loss")) == 6
    torch.testing.assert_close(_series(h2, "loss"), _series(h1, "loss"), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        _series(h2, "eval_loss"), _series(h1, "eval_loss"), rtol=1e-4, atol=1e-5
    )
    # the global norm (all ranks' shards) drives the fused clipping, which is active here
    norm1, norm2 = _series(h1, "grad_norm"), _series(h2, "grad_norm")
    torch.testing.assert_close(norm2, norm1, rtol=1e-4, atol=1e-5)
    assert (norm1 > 1.0).any()
    # --resume from step 3 continues the same curve
    h3 = _history(out / "metrics.jsonl")
    assert [h["step"] for h in h3] == [h["step"] for h in h2]
    torch.testing.assert_close(_series(h3, "loss"), _series(h2, "loss"), rtol=1e-6, atol=1e-6)
    # the final folder is a plain, full transformers model equal to the single process's
    fsdp_model = AutoModelForCausalLM.from_pretrained(out / "final")
    ref = AutoModelForCausalLM.from_pretrained(one / "final")
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(fsdp_model(ids).logits, ref(ids).logits, rtol=1e-3, atol=1e-3)
    # (final/ is the resumed run's; the uninterrupted run's final weights are the same)
    whole = AutoModelForCausalLM.from_pretrained(out / "uninterrupted_final").state_dict()
    for name, value in fsdp_model.state_dict().items():
        torch.testing.assert_close(value, whole[name], rtol=1e-5, atol=1e-6, msg=name)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


@pytest.mark.parametrize(
    "bad, named",
    [
        ("freeze.embedding_rows=[3,4] optim.name=torch_adamw", "freeze.embedding_rows"),
        ("eval.tasks=arc_easy", "eval.tasks"),
        ("freeze.lora.merge=true", "freeze.lora.merge"),
    ],
)
def test_fsdp_refuses_what_it_cannot_shard(bad, named, capsys):
    overrides = ["distributed=fsdp", "freeze.full=false", *bad.split()]
    with pytest.raises(ValueError, match=f"distributed=fsdp does not support {named}"):
        load_config(None, overrides)
    assert main(["train", *overrides]) == 2
    assert named in capsys.readouterr().err


def _runs_worker(rank: int, world: int, ports: list[int], runs: list[list[str]]) -> None:
    for port, overrides in zip(ports, runs, strict=True):
        torchrun_env(rank, world, port)
        Recipe(load_config(None, overrides)).run()


FROZEN = {  # name -> (overrides, the weights that must not change)
    # whole frozen modules (requires_grad=False) inside sharded units, torch's AdamW + clipping
    "top block + norm, torch_adamw": (
        [
            "freeze.top_blocks=1",
            "freeze.norm=true",
            "optim.name=torch_adamw",
            "optim.max_grad_norm=0.1",
        ],
        lambda name, row: name.startswith(("model.layers.0.", "model.embed_tokens.")),
    ),
    # per-row masks of the sharded (tied) embedding: rows 3 and 7 on rank 0, 250 on rank 1
    "embedding rows, fused_adamw": (
        ["freeze.embedding_rows=[3,7,250]", "optim.weight_decay=0.1", "optim.max_grad_norm=0.003"],
        lambda name, row: not name.startswith("model.embed_tokens.") or row not in (3, 7, 250),
    ),
}


def test_fsdp_trains_with_frozen_parts(tiny_train_dir, tmp_path):
    """Frozen modules and frozen embedding rows under FSDP: the losses, grad norms (clipped) and
    final weights match one process's, and exactly the frozen weights stay as they were."""
    from safetensors.torch import load_file

    common = [
        *tiny_run_overrides(tiny_train_dir, tmp_path),
        "freeze.full=false",
        "eval.every=0",
        "max_steps=3",
    ]
    runs = {name: [*common, *extra] for name, (extra, _) in FROZEN.items()}
    for i, overrides in enumerate(runs.values()):
        out = f"output_dir={tmp_path / f'one{i}'}"
        Recipe(load_config(None, [*overrides, "batch_size=4", out])).run()
    spawn_ranks(
        _runs_worker,
        [free_port() for _ in runs],
        [
            [*overrides, "distributed=fsdp", "batch_size=2", f"output_dir={tmp_path / f'two{i}'}"]
            for i, overrides in enumerate(runs.values())
        ],
    )
    start = load_file(str(tiny_train_dir / "model.safetensors"))
    for i, (name, (_, frozen)) in enumerate(FROZEN.items()):
        one, two = tmp_path / f"one{i}", tmp_path / f"two{i}"
        h1, h2 = _history(one / "metrics.jsonl"), _history(two / "metrics.jsonl")
        for key in ("loss", "grad_norm"):
            torch.testing.assert_close(
                _series(h2, key), _series(h1, key), rtol=1e-4, atol=1e-5, msg=f"{name}: {key}"
            )
        clip = load_config(None, runs[name]).optim.max_grad_norm
        assert (_series(h1, "grad_norm") > clip).all(), name  # clipped at every step
        got = load_file(str(two / "final" / "model.safetensors"))
        ref = load_file(str(one / "final" / "model.safetensors"))
        assert got.keys() == ref.keys()
        for key, value in got.items():
            torch.testing.assert_close(value, ref[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
            same = (value == start[key]).reshape(value.shape[0], -1).all(dim=1)
            want = torch.tensor([frozen(key, r) for r in range(value.shape[0])])
            assert torch.equal(same, want), f"{name}: {key}"
