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
