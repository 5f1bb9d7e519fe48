"""Writing an evaluation run: results.json, samples_<task>.jsonl, a Markdown table, a bar chart.

Every file is written atomically (temp file + rename), so an interrupted run never leaves a
half-written result; a re-run into the same folder replaces files whole. :class:`RunWriter`
keeps the folder current while a run goes: results.json before any work, then after each task.

results.json carries every metric twice: pyfast's key (``acc``, ``acc_stderr``,
``exact_match,strict-match``, ``exact_match,strict-match_stderr``) and lm-evaluation-harness
0.4's (``acc,none``, ``acc_stderr,none``, ``exact_match,strict-match``,
``exact_match_stderr,strict-match``; humaneval's filter is ``create_test``, truthfulqa_mc2's
``mc2`` is lm-eval's ``acc``), so tools that read lm-eval's output read pyfast's (see
docs/eval.md for the mapping).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from pyfast.io import atomic_write, write_figure, write_json, write_text

# lm-eval's filter name for metrics that pyfast reports without one ("none" otherwise), and
# lm-eval's name where pyfast's metric has another (truthfulqa_mc2 reports its mc2 as acc).
LM_EVAL_FILTER = {"humaneval": "create_test"}
LM_EVAL_METRIC = {("truthfulqa_mc2", "mc2"): "acc"}
_NOT_METRICS = ("n", "split", "nan_documents", "alias")


class OutputError(ValueError):
    """The run folder cannot be written (a file in the way, no permission, a full disk)."""


def check_output_dir(folder: str | Path) -> Path:
    """Creates `folder` if needed; raises :class:`OutputError` (one line) where it is a file, its
    parent is a file, or it cannot be written. Called before any work."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output path {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable")
    return folder


def _guarded(path: Path, write, *args):
    """`write(path, *args)`, an OSError (full disk, permissions) turned into OutputError."""
    try:
        return write(path, *args)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def lm_eval_row(task: str, row: dict) -> dict:
    """`row` plus lm-eval 0.4's keys for its metrics: ``<metric>,<filter>`` and
    ``<metric>_stderr,<filter>`` (stderr "N/A" where none), and ``alias``."""
    out = dict(row)
    default = LM_EVAL_FILTER.get(task, "none")
    for key, value in row.items():
        if key in _NOT_METRICS or key.endswith("_stderr") or "_stderr," in key:
            continue
        if not (value is None or isinstance(value, (int, float))):
            continue
        metric, sep, filt = key.partition(",")
        filt = filt if sep else default
        metric = LM_EVAL_METRIC.get((task, metric), metric)
        out[f"{metric},{filt}"] = value
        if f"{key}_stderr" in row:
            se = row[f"{key}_stderr"]
            out[f"{metric}_stderr,{filt}"] = "N/A" if se is None else se
    out.setdefault("alias", task)
    return out


def results_json(out: dict) -> dict:
    """The results.json record of `out`: no samples, lm-eval keys beside pyfast's, n-shot."""
    record = {k: v for k, v in out.items() if k != "samples"}
    record["results"] = {t: lm_eval_row(t, r) for t, r in out.get("results", {}).items()}
    shots = out.get("config", {}).get("task_num_fewshot")
    if shots:
        record["n-shot"] = dict(shots)
    return record


def _write_samples(path: Path, rows: list) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    return atomic_write(path, write)


class RunWriter:
    """Keeps a run folder current: :meth:`begin` (results.json with status "running", before
    any work), :meth:`task_done` (the task's samples, then results.json with every finished
    task), :meth:`finish` (status "complete"), :meth:`abort` (status "interrupted" or
    "failed", best effort). Every write is atomic; any OSError becomes :class:`OutputError`."""

    def __init__(self, folder: str | Path, log_samples: bool = False):
        self.folder = check_output_dir(folder)
        self.log_samples = log_samples
        self.last: dict | None = None

    def _json(self, record: dict) -> None:
        _guarded(self.folder / "results.json", write_json, results_json(record))
        self.last = record

    def begin(self, config: dict) -> None:
        import pyfast

        self._json({
            "status": "running",
            "results": {},
            "config": config,
            "pyfast_version": pyfast.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        })  # fmt: skip

    def task_done(self, task: str, samples: list | None, record: dict) -> None:
        if samples is not None:
            _guarded(self.folder / f"samples_{task}.jsonl", _write_samples, samples)
        self._json(record)

    def finish(self, out: dict) -> None:
        self._json(out)

    def abort(self, exc: BaseException) -> None:
        if self.last is None or self.last.get("status") == "complete":
            return
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        lines = str(exc).strip().splitlines()
        error = f"{type(exc).__name__}: {lines[0] if lines else ''}"
        try:
            self._json({**self.last, "status": status, "error": error})
        except OutputError:
            pass  # the disk that failed the run cannot take its epitaph either


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4f}"


def markdown_table(out: dict) -> str:
    """| task | n | metric | value | stderr | rows, tasks first then groups."""
    lines = ["| task | n | metric | value | ± stderr |", "|---|---:|---|---:|---:|"]
    res = out["results"]
    groups = set(out.get("groups", {}))
    for name in [*(t for t in res if t not in groups), *sorted(groups)]:
        r = res[name]
        shown = name if name not in groups else f"**{name}**"
        for m in sorted(k for k in r if k not in ("n", "split") and not k.endswith("_stderr")):
            lines.append(f"| {shown} | {r['n']} | {m} | {_fmt(r[m])} | {_fmt(r[m + '_stderr'])} |")
    t = out.get("timings", {})
    if t.get("requests"):
        lines.append("")
        lines.append(
            f"{t['requests']} requests scored in {t['score_s']:.1f} s "
            f"({t['requests_per_s']} requests/s)"
        )
    return "\n".join(lines)


def bar_chart(out: dict, path: Path) -> Path:
    """One bar per (task, metric) with stderr whiskers, saved as PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, errs = [], [], []
    for name, r in out["results"].items():
        for m in sorted(k for k in r if k not in ("n", "split") and not k.endswith("_stderr")):
            labels.append(f"{name}\n{m}")
            values.append(r[m])
            errs.append(r.get(f"{m}_stderr") or 0.0)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(labels) + 1.5), 4.0))
    ax.bar(range(len(values)), values, yerr=errs, capsize=3, color="#4C72B0")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    if all(0.0 <= v <= 1.0 for v in values):  # BLEU/ROUGE (0-100) and *_diff keep their range
        ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(f"pyfast eval: {out['model'].get('spec', '?')}", fontsize=9)
    fig.tight_layout()
    return write_figure(path, fig, dpi=120)


def write_run(out: dict, folder: str | Path, samples: bool = True) -> list[Path]:
    """Writes results.json (first), samples_<task>.jsonl (if logged and `samples`), results.md
    and results.png. Raises :class:`OutputError` (one line) where the folder cannot be written."""
    folder = check_output_dir(folder)
    written = [_guarded(folder / "results.json", write_json, results_json(out))]
    for task, rows in (out.get("samples", {}) if samples else {}).items():
        written.append(_guarded(folder / f"samples_{task}.jsonl", _write_samples, rows))
    written.append(_guarded(folder / "results.md", write_text, markdown_table(out) + "\n"))
    written.append(_guarded(folder / "results.png", lambda p: bar_chart(out, p)))
    if "mt_bench" in out["results"]:  # categories of the judged answers on a radar chart
        from pyfast.eval.mt_bench import CATEGORIES, radar_chart

        scores = {c: out["results"]["mt_bench"].get(c) for c in CATEGORIES}
        if any(v is not None for v in scores.values()):
            title = f"MT-Bench: {out['model'].get('spec', '?')}"
            path = folder / "mt_bench_radar.png"
            written.append(_guarded(path, lambda p: radar_chart(scores, p, title)))
    return written
