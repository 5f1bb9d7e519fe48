"""Writing an evaluation run: results.json, samples_<task>.jsonl, a Markdown table, a bar chart.

Every file is written atomically (temp file + rename), so an interrupted run never leaves a
half-written result; a re-run into the same folder replaces files whole.
"""

from __future__ import annotations

import json
from pathlib import Path

from pyfast.io import atomic_write, write_figure, write_json, write_text


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


def write_run(out: dict, folder: str | Path) -> list[Path]:
    """Writes results.json, samples_<task>.jsonl (if logged), results.md and results.png."""
    folder = Path(folder)
    samples = out.get("samples", {})
    written = []
    for task, rows in samples.items():

        def write(tmp: str, rows=rows) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")

        written.append(atomic_write(folder / f"samples_{task}.jsonl", write))
    summary = {k: v for k, v in out.items() if k != "samples"}
    written.append(write_text(folder / "results.md", markdown_table(out) + "\n"))
    written.append(bar_chart(out, folder / "results.png"))
    if "mt_bench" in out["results"]:  # categories of the judged answers on a radar chart
        from pyfast.eval.mt_bench import CATEGORIES, radar_chart

        scores = {c: out["results"]["mt_bench"].get(c) for c in CATEGORIES}
        if any(v is not None for v in scores.values()):
            title = f"MT-Bench: {out['model'].get('spec', '?')}"
            written.append(radar_chart(scores, folder / "mt_bench_radar.png", title))
    # results.json last: its presence marks a complete run folder.
    written.append(write_json(folder / "results.json", summary))
    return written
