"""Runs that never lose or mix data (issue 21): output-folder rules, the lock, --resume and
--overwrite, one-line errors before any work, umask, on the tiny random Llama."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyfast.cli import main
from pyfast.train import Recipe, load_config
from pyfast.train import checkpoint as ckpt
from tests.train.conftest import (  # noqa: F401 - fixtures
    tiny_run_overrides,
    tiny_tokenizer,
    tiny_train_dir,
)

LOCK, RUN_JSON = ".pyfast.lock", "run.json"  # pyfast.train.run_folder's names


def _losses(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def _one_line(err: str) -> str:
    """The CLI's error line; stderr holds nothing else but transformers' progress bars."""
    lines = [x for x in err.splitlines() if x.strip() and "it/s]" not in x]
    assert len(lines) == 1 and lines[0].startswith("pyfast ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def six_step_run(tiny_train_dir, tmp_path_factory):  # noqa: F811
    """A finished 6-step run (checkpoint every 3 steps), copied by each test that changes it."""
    out = tmp_path_factory.mktemp("six") / "run"
    over = tiny_run_overrides(tiny_train_dir, out)
    assert main(["train", *over, "save_every=3", "keep_checkpoints=3"]) == 0
    return out, over


@pytest.fixture
def used(six_step_run, tmp_path):
    """(a copy of the 6-step run's folder, the overrides that target it)."""
    src, over = six_step_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    over = [o for o in over if not o.startswith("output_dir=")] + [f"output_dir={out}"]
    return out, [*over, "save_every=3", "keep_checkpoints=3"]


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a model is loaded (a check that must come first did not)."""
    import pyfast.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(pyfast.models, "load_model", refuse)


def test_a_new_run_into_a_used_folder_is_refused_and_changes_nothing(used, capsys, no_model_load):
    out, over = used
    before = _snapshot(out)
    assert main(["train", *over, "max_steps=2"]) == 2
    err = _one_line(capsys.readouterr().err)
    run_id = json.loads((out / RUN_JSON).read_text())["run_id"]
    assert f"output_dir {out} already holds run {run_id}" in err
    assert "last checkpoint step-000006" in err and "--resume" in err and "--overwrite" in err
    assert _snapshot(out) == before  # nothing pruned, nothing deleted, no lock file left


def test_overwrite_moves_the_old_run_aside_never_mixing(used, capsys):
    out, over = used
    before = _snapshot(out)
    assert main(["train", *over, "max_steps=2", "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "done: 2 steps" in text
    (aside,) = out.parent.glob("run.old-*")
    assert f"moved to {aside}" in text
    assert _snapshot(aside) == before  # the old run, whole and untouched
    assert [c.name for c in ckpt.list_checkpoints(out / "checkpoints")] == ["step-000002"]
    assert [r["step"] for r in _losses(out)] == [1, 2]
    new = (out / "final" / "model.safetensors").read_bytes()
    assert new != before["final/model.safetensors"]
    assert (
        json.loads((out / RUN_JSON).read_text())["run_id"] != json.loads(before[RUN_JSON])["run_id"]
    )


def test_resume_applies_its_override_and_refuses_other_changes(used, capsys):
    out, over = used
    assert main(["train", *over, "--resume", "max_steps=8"]) == 0  # the override is applied
    assert "done: 8 steps" in capsys.readouterr().out
    assert [r["step"] for r in _losses(out)] == list(range(1, 9))
    run = json.loads((out / RUN_JSON).read_text())
    assert run["config"]["max_steps"] == 8 and run["resumed"][-1]["changed"]["max_steps"] == [6, 8]
    assert main(["train", *over, "max_steps=8", "optim.lr=0.5", "data.max_length=48",
                 "--resume"]) == 2  # fmt: skip
    err = _one_line(capsys.readouterr().err)
    assert "config differs" in err and "data.max_length (64 -> 48)" in err
    assert "optim.lr (0.01 -> 0.5)" in err
    assert main(["train", *over, "--resume", "max_steps=4"]) == 2
    assert "max_steps=4 is below the checkpoint's step 8" in _one_line(capsys.readouterr().err)
    assert main(["train", *over, "--resume", "--overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    # a checkpoint of another run cannot be resumed into this folder
    other = out.parent / "other"
    assert main(["train", *over, "max_steps=3", f"output_dir={other}"]) == 0
    foreign = ckpt.latest_checkpoint(other)
    assert main(["train", *over, "max_steps=8", f"--resume={foreign}"]) == 2
    assert "belongs to run" in _one_line(capsys.readouterr().err)


def test_a_second_run_into_a_busy_folder_exits_at_once_naming_the_holder(
    tiny_train_dir,  # noqa: F811
    tmp_path,
    capsys,
):
    out = tmp_path / "run"
    over = tiny_run_overrides(tiny_train_dir, out)
    first = Recipe(load_config(None, over))
    first.setup()  # holds the folder until cleanup()
    try:
        t = time.perf_counter()
        assert main(["train", *over, "max_steps=2"]) == 2
        took = time.perf_counter() - t
        err = _one_line(capsys.readouterr().err)
        assert f"output_dir {out} is in use by another run (pid {os.getpid()} on" in err
        assert "--overwrite" not in err and took < 30
        assert main(["train", *over, "--overwrite"]) == 2  # not even --overwrite
        assert "in use by another run" in capsys.readouterr().err
        assert (out / "final").exists() is False
    finally:
        first.cleanup()
    assert not (out / LOCK).exists()


def test_a_dead_holder_does_not_block(tiny_train_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    holder = (
        "import fcntl, os, sys, time\n"
        "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write(f'pid {os.getpid()} on elsewhere'); f.flush(); print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder, str(out / LOCK)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        over = tiny_run_overrides(tiny_train_dir, out)
        assert main(["train", *over, "max_steps=1"]) == 2
        assert f"in use by another run (pid {proc.pid} on elsewhere)" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()
    assert (out / LOCK).exists()  # its stale file stays behind; the lock itself died with it
    assert main(["train", *over, "max_steps=1", "eval.every=0"]) == 0
    assert not (out / LOCK).exists()


def _unwritable(tmp_path: Path) -> Path | None:
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro / "run"
    probe = Path("/sys/pyfast-unwritable-probe")  # root: sysfs refuses new folders
    try:
        probe.mkdir()
    except OSError:
        return probe
    probe.rmdir()
    return None


def test_bad_output_paths_fail_before_any_work(tiny_train_dir, tmp_path, capsys, no_model_load):  # noqa: F811
    afile = tmp_path / "afile"
    afile.write_text("x")
    over = tiny_run_overrides(tiny_train_dir, afile)
    assert main(["train", *over]) == 2
    assert f"output_dir {afile} is a file" in _one_line(capsys.readouterr().err)
    target = _unwritable(tmp_path)
    if target is None:
        pytest.skip("no unwritable place on this machine")
    assert main(["train", *tiny_run_overrides(tiny_train_dir, target)]) == 2
    assert f"cannot create output_dir {target}" in _one_line(capsys.readouterr().err)


def test_data_files_are_checked_before_the_model_loads(
    tiny_train_dir,  # noqa: F811
    tmp_path,
    capsys,
    no_model_load,
):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n{"oops"\n')
    over = tiny_run_overrides(tiny_train_dir, tmp_path / "run")
    over = [o for o in over if not o.startswith(("data.path", "data.format"))]
    assert main(["train", *over, f"data.path={bad}"]) == 2
    assert f"{bad}:3: malformed JSON" in _one_line(capsys.readouterr().err)
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    assert main(["train", *over, f"data.path={bad}"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"{bad}:2: missing field 'completion'" in err
    assert main(["train", *over, f"data.path={tmp_path / 'none.jsonl'}"]) == 2
    assert "data file not found" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()  # a refused run leaves no folder behind
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p"}\n')
    assert main(["align", *over, f"data.path={pairs}", "align.max_prompt_length=32"]) == 2
    assert f"{pairs}:2: missing field 'chosen'" in _one_line(capsys.readouterr().err)


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(
    tiny_train_dir,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
):
    import torch

    out = tmp_path / "run"
    over = [*tiny_run_overrides(tiny_train_dir, out), "save_every=2", "eval.every=0"]
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert main(["train", *over]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"cannot write {out / 'checkpoints' / 'step-000004'}: No space left on device" in err
    assert [c.name for c in ckpt.list_checkpoints(out / "checkpoints")] == ["step-000002"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_damaged_safetensors_are_one_line(used, tiny_train_dir, tmp_path, capsys):  # noqa: F811
    out, over = used
    model = tmp_path / "model"
    shutil.copytree(tiny_train_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    fresh = [o for o in over if not o.startswith(("model.name", "output_dir"))]
    assert main(["train", *fresh, f"model.name={model}", f"output_dir={tmp_path / 'r'}"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"cannot load model from {model}" in err and "SafetensorError" in err
    last = ckpt.latest_checkpoint(out) / "model.safetensors"
    last.write_bytes(b"\x00" * 64)
    assert main(["train", *over, "--resume"]) == 2
    assert f"{last}: damaged safetensors file" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(tiny_train_dir, tmp_path, umask):  # noqa: F811
    out = tmp_path / "run"
    old = os.umask(umask)
    try:
        assert main(["train", *tiny_run_overrides(tiny_train_dir, out), "max_steps=1"]) == 0
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for rel in ("final/model.safetensors", "final/config.json", "summary.json", "metrics.jsonl",
                RUN_JSON, "checkpoints/step-000001/trainer_state.pt",
                "checkpoints/step-000001/model.safetensors", "best/best_metrics.json"):  # fmt: skip
        assert (out / rel).stat().st_mode & 0o777 == want, (rel, oct((out / rel).stat().st_mode))
    assert (out / "final").stat().st_mode & 0o777 == 0o777 & ~umask


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    from pyfast import __version__

    assert capsys.readouterr().out.startswith(f"pyfast {__version__} (torch ")
