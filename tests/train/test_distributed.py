"""DDP on CPU (gloo): 2 processes match one process at the same global batch."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pyfast.train import Recipe, load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, overrides: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    Recipe(load_config(None, overrides)).run()


def _history(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_ranks_match_one_process(base_overrides, tmp_path):
    common = [*base_overrides, "eval.every=3", "save_final=true"]
    single = Recipe(load_config(None, [*common, "batch_size=4", f"output_dir={tmp_path / 'one'}"]))
    single.run()
    port = _free_port()
    # spawn, not fork: forking a process whose autograd engine has run is unsafe
    mp.start_processes(
        _worker,
        args=(2, port, [*common, "batch_size=2", f"output_dir={tmp_path / 'two'}"]),
        nprocs=2,
        start_method="spawn",
    )
    one, two = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert [h["step"] for h in one] == [h["step"] for h in two]
    loss1 = torch.tensor([h["loss"] for h in one if "loss" in h])
    loss2 = torch.tensor([h["loss"] for h in two if "loss" in h])
    assert len(loss1) == 6
    torch.testing.assert_close(loss2, loss1, rtol=1e-4, atol=1e-5)
    ev1 = torch.tensor([h["eval_loss"] for h in one if "eval_loss" in h])
    ev2 = torch.tensor([h["eval_loss"] for h in two if "eval_loss" in h])
    torch.testing.assert_close(ev2, ev1, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    assert (tmp_path / "two" / "final" / "config.json").is_file()
