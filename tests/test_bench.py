"""pyfast bench: the report is produced end to end (small sizes here; the real ones in README)."""

import json

import pytest
import torch

from pyfast.bench import logprobs, optim
from pyfast.cli import main


def test_bench_optim_writes_json_markdown_and_png(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "optim", "--size", "small", "--rounds", "1", "--output", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["meta"]["ceilings"]["copy_gbps"] > 0
    rows = {(r["case"], r["provider"]): r for r in report["results"]}
    for case in optim.CASES:
        assert any(c == f"{case} [small]" for c, _ in rows), case
    pyfast_step = rows[("step [small]", "pyfast")]
    assert pyfast_step["median_ms"] > 0 and "torch-fused" in pyfast_step["ratios"]
    assert rows[("frozen90 [small]", "pyfast-masked")]["ratios"]["pyfast-unmasked"] > 0
    assert (out / "results.md").read_text().startswith("# pyfast bench (optim)")
    assert (out / "speedups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| step [small] | pyfast |" in capsys.readouterr().out


def test_logprob_suite_runs_every_case(monkeypatch):
    for name, value in dict(B=2, T=8, V=300, N=16, D=8).items():
        monkeypatch.setattr(logprobs, name, value)
    results = logprobs.run(rounds=1, log=lambda *_: None)
    cases = {r.case for r in results}
    assert cases == set(logprobs.CASES)
    for r in results:
        assert r.median_ms > 0
        if r.provider == "pyfast":
            assert r.ratios and all(v > 0 for v in r.ratios.values())
        if r.case.startswith("hidden"):
            assert "tflops" in r.extra and "extra_vs_NxV_fp32_logits" in r.extra


def test_bench_bad_arguments(capsys):
    assert main(["bench", "optim", "--rounds", "0"]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "nonsense"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            main(["bench", "optim", "--device", "cuda"])


def test_back_to_back_timing_and_its_column():
    """time_back_to_back: `calls` calls between two synchronisations, best of `rounds`, per call;
    recorded only on a GPU; the table gains its column (with the share of the ceiling) only when
    some result has it."""
    import time

    from pyfast.bench import common

    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.008 if len(calls) <= 4 else 0.001)  # the first round is the slow one

    per_call = common.time_back_to_back(fn, torch.device("cpu"), calls=4, rounds=3)
    assert len(calls) == 12 and 0.001 <= per_call < 0.006
    r = common.Result("step", "pyfast", 2.0, 0.1, bytes_moved=4 * 10**9, gbps=2000.0,
                      peak_mem_mb=1.0)  # fmt: skip
    common.add_back_to_back(r, fn, torch.device("cpu"))
    assert r.extra == {} and len(calls) == 12  # nothing to add on the CPU
    ceilings = {"copy_gbps": 4000.0, "matmul_tflops_fp32": 40.0}
    plain = common.markdown_table([r], ceilings)
    assert "back-to-back" not in plain and plain.splitlines()[1] == "|---" * 7 + "|"
    r.extra.update(back_to_back_ms=1.25, back_to_back_gbps=3200.0)
    h = common.Result(
        "hidden",
        "pyfast",
        6.0,
        0.1,
        0,
        0.0,
        16.0,
        extra={"tflops": 39.0, "back_to_back_ms": 5.9, "back_to_back_tflops": 38.0},
    )
    lines = common.markdown_table([r, h], ceilings).splitlines()
    assert "back-to-back ms (throughput)" in lines[0] and lines[1] == "|---" * 8 + "|"
    assert "| 1.25 (3200 GB/s, 80%) |" in lines[2]
    assert "| 5.90 (38.0 TFLOP/s, 95%) |" in lines[3]
    assert all(line.count("|") == 9 for line in lines)
