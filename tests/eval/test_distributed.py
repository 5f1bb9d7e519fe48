"""torchrun sharding: documents split across 2 gloo ranks give the single-process results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from pyfast.cli import main

from .conftest import DATA

ARGS = [
    "--tasks",
    "arc_easy,truthfulqa_mc2,gsm8k",
    "--data-dir",
    str(DATA),
    "--split",
    "validation,gsm8k=train",
    "--limit",
    "6",
    "--gen-kwargs",
    "max_gen_toks=8",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over localhost")
def test_torchrun_two_ranks_match_single_process(tiny_model_dir, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    common = ["eval", "--model", str(tiny_model_dir), *ARGS, "--log-samples"]
    assert main([*common, "--output", str(single)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd = [*run, "--master_port", str(_free_port()), "-m", "pyfast.cli", *common]
    cmd += ["--output", str(multi)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = json.loads((single / "results.json").read_text())
    b = json.loads((multi / "results.json").read_text())
    assert b["config"]["world_size"] == 2
    for task, res in a["results"].items():
        numbers = {k: v for k, v in res.items() if isinstance(v, float | int)}
        assert {k: b["results"][task][k] for k in numbers} == pytest.approx(numbers, rel=1e-5)
    for name in ("samples_arc_easy.jsonl", "samples_truthfulqa_mc2.jsonl"):
        sa = [json.loads(x) for x in (single / name).read_text().splitlines()]
        sb = [json.loads(x) for x in (multi / name).read_text().splitlines()]
        assert [s["prediction"] for s in sa] == [s["prediction"] for s in sb]
        for x, y in zip(sa, sb, strict=True):
            assert x["loglikelihoods"] == pytest.approx(y["loglikelihoods"], rel=1e-5)
    sa, sb = ([json.loads(x) for x in (d / "samples_gsm8k.jsonl").read_text().splitlines()]
              for d in (single, multi))  # fmt: skip
    assert [s["generation"] for s in sa] == [s["generation"] for s in sb]
    assert len(list(multi.glob("generations_gsm8k.rank*.jsonl"))) == 2  # one cache per rank
