"""`pyfast eval` keeps its work: output checks, results.json as it goes, a full disk, resume of
log-likelihood tasks, lm-eval's flags and keys, progress, and the models it loads (LoRA output,
hub ids offline, corrupted weights)."""

from __future__ import annotations

import copy
import errno
import json
import shutil

import pytest
import torch

from pyfast.cli import main
from pyfast.eval import HFLM, evaluate, gen_cache, report

from .conftest import DATA

TASKS = "arc_easy,hellaswag"
SPLIT = "validation,hellaswag=train"


class CountingLM(HFLM):
    """HFLM that counts the requests it scores and can stop (like Ctrl-C) after k calls."""

    def __init__(self, *a, stop_after: int | None = None, **kw):
        super().__init__(*a, **kw)
        self.scored, self.calls, self.stop_after = 0, 0, stop_after

    def loglikelihood(self, requests, progress=None):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.scored += len(requests)
        return super().loglikelihood(requests, progress=progress)


def _eval(lm, out, **kw):
    args = dict(data_dir=DATA, split=SPLIT, limit=6, output=out, log_samples=True)
    return evaluate(lm, TASKS, **{**args, **kw})


def _metrics(folder):
    res = json.loads((folder / "results.json").read_text())
    return {t: {k: v for k, v in r.items() if k != "split"} for t, r in res["results"].items()}


def _samples(folder, task):
    return [json.loads(x) for x in (folder / f"samples_{task}.jsonl").read_text().splitlines()]


def test_loglikelihood_tasks_resume_with_identical_results(
    tiny_model, tiny_tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setattr(gen_cache, "LL_CHUNK_REQUESTS", 8)  # a few chunks per task
    full = CountingLM(tiny_model, tiny_tokenizer, batch_size=4)
    _eval(full, tmp_path / "full")
    total = full.scored
    assert full.calls >= 4  # several chunks, so an interruption falls in the middle

    cut = CountingLM(tiny_model, tiny_tokenizer, batch_size=4, stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        _eval(cut, tmp_path / "cut")
    record = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert record["status"] == "interrupted"
    done = cut.scored

    again = CountingLM(tiny_model, tiny_tokenizer, batch_size=4)
    _eval(again, tmp_path / "cut", resume=True)
    assert again.scored == total - done  # the cached requests are not scored again
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "full")  # bit for bit
    for task in ("arc_easy", "hellaswag"):
        assert _samples(tmp_path / "cut", task) == _samples(tmp_path / "full", task)

    # without --resume the cache restarts; with it, another model's cache is refused
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    with pytest.raises(ValueError, match="cached log-likelihoods were made for"):
        _eval(HFLM(other, tiny_tokenizer, batch_size=4), tmp_path / "cut", resume=True)
    fresh = CountingLM(tiny_model, tiny_tokenizer, batch_size=4)
    _eval(fresh, tmp_path / "cut")
    assert fresh.scored == total


def test_results_json_first_and_after_each_task(tiny_model, tiny_tokenizer, tmp_path):
    seen = []
    out = tmp_path / "run"

    class Peek(HFLM):
        def loglikelihood(self, requests, progress=None):
            seen.append(json.loads((out / "results.json").read_text()))
            return super().loglikelihood(requests, progress=progress)

    _eval(Peek(tiny_model, tiny_tokenizer), out)
    first = seen[0]
    assert first["status"] == "running" and first["results"] == {}
    assert first["config"]["tasks"] == ["arc_easy", "hellaswag"]
    last = seen[-1]  # scoring hellaswag: arc_easy is on disk with its samples
    assert last["status"] == "running" and set(last["results"]) == {"arc_easy"}
    assert last["results"]["arc_easy"]["acc,none"] == last["results"]["arc_easy"]["acc"]
    final = json.loads((out / "results.json").read_text())
    assert final["status"] == "complete" and set(final["results"]) == {"arc_easy", "hellaswag"}
    assert final["timings"]["task_s"].keys() == {"arc_easy", "hellaswag"}


def _cli(model_dir, out, *extra):
    argv = ["eval", "--model", str(model_dir), "--tasks", TASKS, "--data-dir", str(DATA)]
    return main([*argv, "--split", SPLIT, "--limit", "3", "--output", str(out), *extra])


def test_output_path_checked_before_the_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import pyfast.models

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(pyfast.models, "load_model", no_load)
    target = tmp_path / "a_file"
    target.write_text("not a folder")
    assert _cli(tiny_model_dir, target) == 2
    err = capsys.readouterr().err
    assert err == f"pyfast eval: error: output path {target} is a file, not a folder\n"
    assert _cli(tiny_model_dir, target / "below") == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("pyfast eval: error: cannot create output folder") and err.count("\n") == 1
    )


def test_full_disk_one_line_and_finished_tasks_kept(tiny_model_dir, tmp_path, capsys, monkeypatch):
    calls = []
    real = report.write_json

    def full_disk(path, obj):
        calls.append(path)
        if len(calls) >= 3:  # begin, after arc_easy, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, obj)

    monkeypatch.setattr(report, "write_json", full_disk)
    out = tmp_path / "run"
    assert _cli(tiny_model_dir, out, "--log-samples") == 2
    err = capsys.readouterr().err.splitlines()
    assert (
        err[-1]
        == f"pyfast eval: error: cannot write {out / 'results.json'}: No space left on device"
    )
    assert sum(1 for line in err if "error" in line) == 1
    kept = json.loads((out / "results.json").read_text())
    assert kept["status"] == "running" and set(kept["results"]) == {"arc_easy"}
    assert len(_samples(out, "arc_easy")) == 3
    assert not list(out.glob(".*.tmp"))


def test_lm_eval_flags_keys_and_progress(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["eval", "--model", "hf", "--model_args", f"pretrained={tiny_model_dir}"]
    argv += ["--tasks", "arc_easy,truthfulqa_mc2", "--data_dir", str(DATA), "--split"]
    argv += ["validation", "--limit", "3", "--num_fewshot", "1", "--batch_size", "4"]
    assert main([*argv, "--output_path", str(out), "--log_samples"]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("pyfast eval: ")]
    assert lines[0].startswith("pyfast eval: arc_easy: acc ") and "(n=3, " in lines[0]
    assert lines[1].startswith("pyfast eval: truthfulqa_mc2: mc2 ")
    assert "loglikelihood" not in err  # no bars when stderr is not a terminal
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["num_fewshot"] == 1 and res["config"]["batch_size"] == 4
    arc = res["results"]["arc_easy"]
    for m in ("acc", "acc_norm"):
        assert arc[f"{m},none"] == arc[m] and arc[f"{m}_stderr,none"] == arc[f"{m}_stderr"]
    assert res["results"]["truthfulqa_mc2"]["acc,none"] == res["results"]["truthfulqa_mc2"]["mc2"]
    assert res["n-shot"] == {"arc_easy": 1, "truthfulqa_mc2": 1}
    assert (out / "samples_arc_easy.jsonl").is_file() and (out / "results.md").is_file()
    assert (
        main(
            ["eval", "--model", "hf", "--model_args", "pretrained=x,trust=1", "--tasks", "arc_easy"]
        )
        == 2
    )
    assert "unsupported key(s) trust" in capsys.readouterr().err


def test_lm_eval_keys_of_generation_and_code_tasks():
    row = report.lm_eval_row(
        "gsm8k",
        {"n": 5, "split": "test", "exact_match,strict-match": 0.2,
         "exact_match,strict-match_stderr": 0.1, "exact_match,flexible-extract": 0.4,
         "exact_match,flexible-extract_stderr": None},
    )  # fmt: skip
    assert row["exact_match_stderr,strict-match"] == 0.1
    assert row["exact_match,flexible-extract"] == 0.4
    assert row["exact_match_stderr,flexible-extract"] == "N/A"
    assert row["alias"] == "gsm8k" and row["n"] == 5
    he = report.lm_eval_row("humaneval", {"n": 3, "pass@1": 0.5, "pass@1_stderr": 0.2})
    assert he["pass@1,create_test"] == 0.5 and he["pass@1_stderr,create_test"] == 0.2


def test_loglikelihood_progress_counts_every_request(tiny_model, tiny_tokenizer):
    lm = HFLM(tiny_model, tiny_tokenizer, batch_size=2)
    reqs = [("The sky is", " blue"), ("The sky is", " green"), ("Two plus two is", " four")] * 3
    seen = []
    plain = lm.loglikelihood(reqs)
    assert lm.loglikelihood(reqs, progress=lambda n, t: seen.append((n, t))) == plain
    assert sum(n for n, _ in seen) == len(reqs) and all(t > 0 for _, t in seen)


def test_corrupted_safetensors_one_line(tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated by a failed copy
    argv = ["--tasks", "arc_easy", "--data-dir", str(DATA), "--split", "validation"]
    rc = main(["eval", "--model", str(broken), *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pyfast eval: error: cannot load model from {broken}: ")
    assert err.count("\n") == 1


def test_hub_id_offline_one_line(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["eval", "--model", "no-such-org/no-such-model", "--tasks", "arc_easy",
               "--data-dir", str(DATA), "--split", "validation"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "'no-such-org/no-such-model'" in err and "HF_HUB_OFFLINE" in err
    assert err.count("\n") == 1


def test_pyfast_lora_output_evaluates_and_names_its_base(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """A LoRA run's final/ (PEFT adapter files) evaluates; the adapter records the base as the
    user gave it ('default' here), not the cache folder it resolved to."""
    import pyfast.models as models
    from pyfast.train.checkpoint import save_model
    from pyfast.train.config import LoraConfig
    from pyfast.train.freeze import _apply_lora

    monkeypatch.setattr(models, "default_model_folder", lambda: tiny_model_dir)
    base, tok, _ = models.load_model("default", fuse_blocks=False)
    cfg = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    peft_model = _apply_lora(base, cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    final = tmp_path / "runs" / "lora" / "final"
    final.mkdir(parents=True)
    save_model(peft_model, tok, final)
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "default"
    assert not (final / "config.json").exists()

    merged = copy.deepcopy(peft_model).merge_and_unload()
    kw = dict(data_dir=DATA, split="validation", limit=4, log_samples=True)
    want = evaluate(merged, "arc_easy", tokenizer=tok, **kw)["samples"]["arc_easy"]
    fresh, _, _ = models.load_model("default", fuse_blocks=False)
    before = evaluate(fresh, "arc_easy", tokenizer=tok, **kw)["samples"]["arc_easy"]
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(final), "--tasks", "arc_easy", "--data-dir", str(DATA)]
    argv += ["--split", "validation", "--limit", "4", "--log-samples"]
    assert main([*argv, "--output", str(out)]) == 0
    got = json.loads((out / "results.json").read_text())
    assert got["model"]["kind"] == "lora" and got["model"]["base"] == "default"

    def flat(rows):
        return [x for s in rows for x in s["loglikelihoods"]]

    assert flat(_samples(out, "arc_easy")) == pytest.approx(flat(want), abs=1e-4)
    assert flat(_samples(out, "arc_easy")) != pytest.approx(flat(before), abs=1e-3)  # adapted
