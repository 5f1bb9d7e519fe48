"""Fixtures for tests/train: a tiny random Llama folder and small JSONL training files."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from tests.conftest import tiny_llama
from tests.eval.conftest import DATA, tiny_tokenizer  # noqa: F401 - re-exported fixture

ARC_TRAIN = DATA / "arc_easy" / "train.jsonl"


@pytest.fixture(scope="session")
def tiny_train_dir(tiny_tokenizer, tmp_path_factory):  # noqa: F811
    """A random 2-layer LlamaForCausalLM (hidden 32, tied head) saved as a Hugging Face folder."""
    path = tmp_path_factory.mktemp("tiny_train_llama")
    tiny_llama(len(tiny_tokenizer), max_positions=256).save_pretrained(
        path, safe_serialization=True
    )
    tiny_tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_run_overrides(model_dir: Path, output_dir: Path) -> list[str]:
    """Overrides for a fast run of the tiny model at `model_dir` on the ARC test slice."""
    return [
        f"model.name={model_dir}",
        f"data.path={ARC_TRAIN}",
        "data.format=arc",
        "data.max_length=64",
        "data.eval_fraction=0.2",
        "batch_size=4",
        "max_steps=6",
        "optim.lr=1e-2",
        "optim.warmup_steps=2",
        "progress=false",
        "threads=1",  # tiny matmuls: a second thread only adds synchronisation
        "eval.every=3",
        f"output_dir={output_dir}",
    ]


@pytest.fixture
def base_overrides(tiny_train_dir, tmp_path):
    """Overrides for a fast run of the tiny model on the ARC test slice."""
    return tiny_run_overrides(tiny_train_dir, tmp_path / "run")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives rank `rank` of `world` (rendezvous on localhost:`port`)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )


def spawn_ranks(fn, *args) -> None:
    """Runs ``fn(rank, 2, *args)`` in 2 fresh processes (ranks 0 and 1) and waits for both."""
    import torch.multiprocessing as mp

    # spawn, not fork: forking a process whose autograd engine has run is unsafe
    mp.start_processes(fn, args=(2, *args), nprocs=2, start_method="spawn")
