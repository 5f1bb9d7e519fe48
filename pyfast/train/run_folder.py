"""Output folders of ``pyfast train`` / ``pyfast align``: one run per folder, locked while it runs.

The rules (docs/runs.md):

* A new run needs a new or empty ``output_dir`` (a lock file left by a finished run does not
  count). A folder holding anything else is refused, naming what it holds.
* ``--resume`` continues the run recorded in the folder: ``run.json`` holds its run id and
  resolved config, every checkpoint its run id and config. The config may differ from the
  checkpoint's only in :data:`RESUMABLE_KEYS` (``max_steps`` and other keys that change neither
  the data nor the math of a step); any other difference is refused with the keys named.
* ``--overwrite`` moves the folder's contents aside to the sibling ``<out>.old-<timestamp>``
  before the new run starts: nothing is mixed, nothing is deleted.
* While a run works in the folder it holds an exclusive ``flock`` on ``<out>/.pyfast.lock``
  (which also records pid, host and start time): a second run into the same folder stops at
  once, naming the holder. The kernel drops the lock when its process dies, so a killed run
  never blocks the next one.

Every refusal is a :class:`FolderError` (a ValueError: the CLI prints its one line, exit 2).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import yaml

from pyfast.io import write_json
from pyfast.train import checkpoint as ckpt

RUN_JSON = "run.json"
LOCK = ".pyfast.lock"

# Keys a resumed run may change: how long it runs, how it reports and saves, how many threads.
# Everything else (data, model, optimizer, schedule shape, seed, batch geometry) must match.
RESUMABLE_KEYS = (
    "max_steps",
    "epochs",
    "output_dir",  # a run folder moved elsewhere resumes from its new place
    "progress",
    "threads",
    "log_every",
    "save_every",
    "keep_checkpoints",
    "save_final",
    "trim_heap_every",
    "eval.batch_size",
    "align.reference_batch_size",
    "align.reference_cache",
)
# Keys compared as the files they name (a relative and an absolute spelling of one file agree).
_PATH_KEYS = ("model.name", "data.path", "data.eval_path", "eval.tasks_data_dir")


class FolderError(ValueError):
    """A run may not use its output folder (one line for the user)."""


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _as_paths(value):
    def one(v):
        return os.path.realpath(v) if isinstance(v, str) and os.path.exists(v) else v

    return [one(v) for v in value] if isinstance(value, list) else one(value)


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """``{dotted key: (old, new)}`` for every key whose value differs between two configs."""
    a, b = flatten(old), flatten(new)
    changes = {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if key in _PATH_KEYS:
            va, vb = _as_paths(va), _as_paths(vb)
        if va != vb:
            changes[key] = (a.get(key), b.get(key))
    return changes


def _sibling(out: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = out.with_name(f"{out.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}.old-{stamp}-{n}")
    return target


class RunFolder:
    """The output folder of one run: path checks, the lock, run.json (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = None  # the open lock file while held
        self._created = False  # whether lock() created the folder

    # -- the lock ------------------------------------------------------------------------------
    def lock(self) -> None:
        """Creates the folder if needed and takes its lock; FolderError if it cannot or another
        process holds it."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise FolderError(f"output_dir {out} is a file, not a folder; choose another path")
        self._created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FolderError(f"cannot create output_dir {out}: {exc.strerror or exc}") from None
        lock = out / LOCK
        while True:
            try:
                f = open(lock, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
            except OSError as exc:
                raise FolderError(
                    f"output_dir {out} is not writable ({exc.strerror or exc}); choose another "
                    "path or fix its permissions"
                ) from None
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise FolderError(
                    f"output_dir {out} is in use by another run ({holder}); wait for it to "
                    "finish or choose another output_dir"
                ) from None
            # The file may have been unlinked between our open and our flock (a holder that
            # removed it on release): then this lock guards nothing; take the new file's.
            try:
                same = os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {_now()}\n")
        f.flush()
        self._lock = f

    def release(self) -> None:
        """Removes the lock file (still held: nobody else has it) and drops the lock; a folder
        that lock() created and the run left empty (a setup that failed) is removed too."""
        f, self._lock = self._lock, None
        if f is None:
            return
        try:
            (self.path / LOCK).unlink(missing_ok=True)
            if self._created and not any(self.path.iterdir()):
                self.path.rmdir()
        except OSError:
            pass
        f.close()

    @property
    def locked(self) -> bool:
        return self._lock is not None

    # -- contents ------------------------------------------------------------------------------
    def contents(self) -> list[str]:
        """Names in the folder other than the lock file (sorted)."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK)

    def read_run(self) -> dict | None:
        path = self.path / RUN_JSON
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def describe(self) -> str:
        """What the folder holds, for a refusal."""
        run = self.read_run()
        last = ckpt.latest_checkpoint(self.path)
        at = f", last checkpoint {last.name}" if last else ", no checkpoint"
        if run:
            return f"run {run.get('run_id', '?')} (started {run.get('started', '?')}{at})"
        names = self.contents()
        more = ", ..." if len(names) > 3 else ""
        return f"files of another run or program ({', '.join(names[:3])}{more}{at})"

    def move_aside(self) -> Path:
        """Moves every entry but the lock to a new sibling ``<out>.old-<timestamp>``."""
        target = _sibling(self.path)
        try:
            target.mkdir()
            for name in self.contents():
                os.replace(self.path / name, target / name)
        except OSError as exc:
            raise FolderError(
                f"--overwrite: cannot move the contents of {self.path} aside to {target}: "
                f"{exc.strerror or exc}"
            ) from None
        return target

    # -- the rules -----------------------------------------------------------------------------
    def claim(self, config: dict, resume, overwrite: bool, log=print) -> tuple[dict, Path | None]:
        """Locks the folder and applies the rules; returns (run record, checkpoint to resume).

        `resume`: None, "latest" or a checkpoint folder. The run record is the folder's run.json
        (resume) or a new one (written by :meth:`write_run` once the run has set up).
        """
        if resume and overwrite:
            raise FolderError("--resume and --overwrite exclude each other")
        self.lock()
        try:
            return self._claim(config, resume, overwrite, log)
        except BaseException:
            self.release()
            raise

    def _claim(self, config: dict, resume, overwrite: bool, log) -> tuple[dict, Path | None]:
        out = self.path
        if not resume:
            if self.contents():
                if not overwrite:
                    raise FolderError(
                        f"output_dir {out} already holds {self.describe()}; pass --resume to "
                        f"continue it, --overwrite to move it aside (to {out}.old-<time>), or "
                        "choose another output_dir"
                    )
                moved = self.move_aside()
                log(f"--overwrite: the previous contents of {out} were moved to {moved}")
            return self.new_run(config), None
        run = self.read_run()
        if str(resume) == "latest":
            found = ckpt.latest_checkpoint(out)
            if found is None:
                raise FolderError(f"--resume: no checkpoint found under {out / 'checkpoints'}")
        else:
            found = Path(resume)
        meta_path, cfg_path = found / ckpt.STATE_JSON, found / "config.yaml"
        if not meta_path.is_file() or not (found / ckpt.STATE_PT).is_file():
            raise FolderError(f"--resume: {found} is not a complete pyfast checkpoint")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            saved = None
            if cfg_path.is_file():
                saved = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise FolderError(f"--resume: cannot read checkpoint {found}: {exc}") from None
        ckpt_id = meta.get("run_id")
        if run is None and self.contents() and not ckpt.list_checkpoints(out / "checkpoints"):
            raise FolderError(
                f"--resume: output_dir {out} holds {self.describe()}, not a pyfast run"
            )
        if run and ckpt_id and run.get("run_id") != ckpt_id:
            raise FolderError(
                f"--resume: checkpoint {found} belongs to run {ckpt_id}, but output_dir {out} "
                f"holds run {run.get('run_id')}; resume into that run's own folder"
            )
        if saved is not None:
            changes = config_changes(saved, config)
            refused = [k for k in changes if k not in RESUMABLE_KEYS]
            if refused:
                shown = ", ".join(
                    f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in refused[:4]
                )
                more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
                raise FolderError(
                    f"--resume: the config differs from the run's (checkpoint {found.name}) in "
                    f"{shown}{more}; only {', '.join(RESUMABLE_KEYS[:2])} and other run-length/"
                    "reporting keys may change on resume (docs/runs.md); start a new run with "
                    "--overwrite or another output_dir"
                )
        steps = flatten(config).get("max_steps") or 0
        if steps and steps < meta.get("step", 0):
            raise FolderError(
                f"--resume: max_steps={steps} is below the checkpoint's step {meta['step']} "
                f"({found}); set max_steps >= {meta['step']}"
            )
        if run is None:
            run = self.new_run(config, run_id=ckpt_id)
        prior = run.get("config") or saved or {}
        changed = {k: list(v) for k, v in config_changes(prior, config).items()}
        run["resumed"] = [*run.get("resumed", []), {
            "from": str(found), "step": meta.get("step"), "at": _now(), "changed": changed,
        }]  # fmt: skip
        run["config"] = config
        return run, found

    @staticmethod
    def new_run(config: dict, run_id: str | None = None) -> dict:
        from pyfast import __version__

        return {
            "run_id": run_id or uuid.uuid4().hex[:12],
            "started": _now(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pyfast": __version__,
            "config": config,
        }

    def write_run(self, run: dict) -> None:
        write_json(self.path / RUN_JSON, run)
