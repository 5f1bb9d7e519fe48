"""evaluate() and `pyfast eval` / `pyfast ls tasks` end to end on the tiny model."""

from __future__ import annotations

import json

import pytest

from pyfast.cli import main
from pyfast.eval import HFLM, evaluate

from .conftest import DATA


def test_evaluate_in_memory_model(tiny_model, tiny_tokenizer):
    out = evaluate(
        tiny_model,
        "arc_easy,mmlu,truthfulqa_mc2",
        tokenizer=tiny_tokenizer,
        data_dir=DATA,
        split="validation",
        limit=2,
        log_samples=True,
    )
    res = out["results"]
    assert res["arc_easy"]["n"] == 2 and 0.0 <= res["arc_easy"]["acc_norm"] <= 1.0
    assert res["mmlu"]["n"] == 8 and set(out["groups"]) >= {"mmlu", "mmlu_stem"}
    assert res["mmlu_stem"]["n"] == 4  # abstract_algebra + high_school_biology, 2 each
    assert 0.0 <= res["truthfulqa_mc2"]["mc2"] <= 1.0
    s = out["samples"]["arc_easy"][0]
    assert {"doc_id", "loglikelihoods", "is_greedy", "gold", "prediction"} <= set(s)
    assert s["prediction"] == max(
        range(len(s["loglikelihoods"])), key=s["loglikelihoods"].__getitem__
    )
    assert out["timings"]["requests"] > 0 and any("arc_easy" in p for p in out["data"]["sha256"])


def test_results_independent_of_batch_size(tiny_model, tiny_tokenizer):
    outs = []
    for bs in (1, 7, 64):
        lm = HFLM(tiny_model, tiny_tokenizer, batch_size=bs)
        outs.append(
            [
                evaluate(lm, t, data_dir=DATA, split=sp, log_samples=True)
                for t, sp in [("hellaswag", "train"), ("arc_challenge", "validation")]
            ]
        )
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            for task in a["samples"]:
                for sa, sb in zip(a["samples"][task], b["samples"][task], strict=True):
                    assert sa["prediction"] == sb["prediction"]
                    assert sa["loglikelihoods"] == pytest.approx(sb["loglikelihoods"], rel=1e-5)
            assert a["results"] == b["results"]


def test_cli_eval_writes_outputs(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "run"
    rc = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--tasks",
            "arc_easy,hellaswag",
            "--data-dir",
            str(DATA),
            "--split",
            "validation",
            "--limit",
            "3",
            "--output",
            str(out_dir),
            "--log-samples",
            "--batch-size",
            "auto",
        ]
    )
    # hellaswag's slice is train: the run above fails on the missing validation file ...
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pyfast eval: error: data file not found:") and "\n" not in err
    assert "hellaswag/validation.jsonl" in err
    rc = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--tasks",
            "arc_easy,hellaswag",
            "--data-dir",
            str(DATA),
            "--split",
            "validation,hellaswag=train",
            "--limit",
            "3",
            "--output",
            str(out_dir),
            "--log-samples",
            "--num-fewshot",
            "1",
            "--pack-weights",
            "off",
        ]
    )
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| arc_easy | 3 | acc |" in stdout
    res = json.loads((out_dir / "results.json").read_text())
    assert res["config"]["num_fewshot"] == 1 and res["model"]["kind"] == "folder"
    assert res["config"]["pack_weights"] is False
    assert res["model"]["linear_weights"] == "off (asked)"
    assert "acc_stderr" in res["results"]["arc_easy"] and res["pyfast_version"]
    assert res["results"]["hellaswag"]["split"] == "train"
    lines = (out_dir / "samples_arc_easy.jsonl").read_text().splitlines()
    assert len(lines) == 3 and (out_dir / "results.png").stat().st_size > 1000
    assert not list(out_dir.glob(".*.tmp"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--tasks", "hellaswagg"], "unknown task 'hellaswagg'; did you mean hellaswag"),
        (["eval", "--tasks", "arc_easy", "--model", "/no/such/model"], "neither 'default'"),
        (["eval", "--tasks", "arc_easy", "--model", "/no/such.gguf"], "model file not found"),
    ],
)
def test_cli_bad_input_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyfast eval: error: ") and message in err and err.count("\n") == 1


def test_cli_batch_size_validation(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--tasks", "arc_easy", "--batch-size", "zero"])
    assert exc.value.code == 2


def test_cli_ls_tasks(capsys):
    assert main(["ls", "tasks"]) == 0
    out = capsys.readouterr().out
    assert "arc_easy" in out and "mmlu_world_religions" in out and "mmlu_stem" in out


def test_nan_loglikelihoods_are_named(tiny_model, tiny_tokenizer):
    """A document whose choices score NaN is named in the results and in a warning."""
    lm = HFLM(tiny_model, tiny_tokenizer)
    real = lm.loglikelihood
    calls = []

    def poisoned(requests):
        out = real(requests)
        calls.append(len(out))
        return [(float("nan"), False) if i == 5 else a for i, a in enumerate(out)]

    lm.loglikelihood = poisoned
    with pytest.warns(UserWarning, match=r"arc_easy: 1 of 3 documents have NaN.*doc_id 1"):
        out = evaluate(lm, "arc_easy", data_dir=DATA, split="validation", limit=3)
    assert calls and out["results"]["arc_easy"]["nan_documents"] == [1]
    lm.loglikelihood = real
    clean = evaluate(lm, "arc_easy", data_dir=DATA, split="validation", limit=3)
    assert "nan_documents" not in clean["results"]["arc_easy"]
