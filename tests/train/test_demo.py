"""The main job's pieces: shipped data, and the demo pipeline end to end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

from pyfast.train import demo
from tests.train.conftest import ARC_TRAIN

DATA = Path(__file__).parents[2] / "data"


def _ids(path: Path) -> set[str]:
    return {json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()}


def test_shipped_demo_data_is_complete_and_held_out():
    for name, n_train in (("arc_easy", 2251), ("arc_challenge", 1119)):
        train, val = _ids(DATA / name / "train.jsonl"), _ids(DATA / name / "validation.jsonl")
        assert len(train) == n_train and len(val) == 100
        assert not train & val  # the evaluation items are never trained on


def test_demo_end_to_end(tiny_train_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "--output",
        str(out),
        "--data-dir",
        str(ARC_TRAIN.parents[1]),
        "--limit",
        "3",
        f"model.name={tiny_train_dir}",
        f"data.path={ARC_TRAIN}",
        "data.max_length=64",
        "batch_size=4",
        "max_steps=2",
        "eval.every=1",
        "data.eval_fraction=0.2",
        "progress=false",
        "threads=1",
        "freeze.top_blocks=1",
    ]
    assert demo.main(argv) == 0
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| arc_easy | acc | 3 |" in report and "| arc_challenge | acc_norm | 3 |" in report
    assert (out / "loss_curve.png").is_file() and "![loss curve](loss_curve.png)" in report
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert set(saved["before"]) == set(saved["after"]) and saved["training"]["steps"] == 2
    assert Path(saved["model"]).name == "best"
    assert demo.main(argv) == 0  # the base model's scores are reused the second time
    assert "reusing" in capsys.readouterr().out
