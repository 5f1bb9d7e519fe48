"""Progress of long evaluation passes: tqdm bars on stderr and one line per finished task.

Bars show only where stderr is a terminal (tqdm's ``disable=None``), so logs and tests stay
clean; the per-task line is always printed when progress is on (``pyfast eval``), so a log
file still says which tasks are done, with their main metric, size and time.
"""

from __future__ import annotations

import sys
import time


class _Bar:
    """A tqdm bar (or nothing) counting requests, with tokens/s in its postfix."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool):
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=total,
            desc=desc,
            unit=unit,
            file=sys.stderr,
            disable=None if enabled else True,
            leave=False,
            dynamic_ncols=True,
        )
        self._t0, self._tokens = time.perf_counter(), 0

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def tokens_done(self, requests: int, tokens: int) -> None:
        """`requests` more scored, reading `tokens` more tokens."""
        self._tokens += tokens
        if tokens and not self._bar.disable:
            rate = self._tokens / max(time.perf_counter() - self._t0, 1e-9)
            self._bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)
        self._bar.update(requests)

    def requests_done(self, lm):
        """A per-request callback for generation: new tokens/s from ``lm.stats``."""
        stats = getattr(lm, "stats", None)
        start = stats.get("generated_tokens", 0) if isinstance(stats, dict) else 0

        def done(*_args) -> None:
            tokens = stats.get("generated_tokens", 0) - start if isinstance(stats, dict) else 0
            if tokens and not self._bar.disable:
                rate = tokens / max(time.perf_counter() - self._t0, 1e-9)
                self._bar.set_postfix_str(f"{rate:.1f} new tok/s", refresh=False)
            self._bar.update(1)

        return done


class Progress:
    """Bars and task lines when `enabled`; silent otherwise."""

    def __init__(self, enabled: bool = False):
        self.enabled = bool(enabled)

    def bar(self, total: int, desc: str, unit: str = "req") -> _Bar:
        return _Bar(total, desc, unit, self.enabled)

    def task_line(self, task: str, res: dict, seconds: float) -> None:
        """``pyfast eval: <task>: <metric> <value> ± <stderr> (n=<n>, <s> s)`` on stderr."""
        if not self.enabled:
            return
        metric = next(
            (
                k
                for k, v in res.items()
                if k not in ("n", "split")
                and not k.endswith("_stderr")
                and isinstance(v, (int, float))
            ),  # fmt: skip
            None,
        )
        shown = "no metric"
        if metric is not None:
            se = res.get(f"{metric}_stderr")
            shown = f"{metric} {res[metric]:.4f}" + (f" ± {se:.4f}" if se is not None else "")
        print(f"pyfast eval: {task}: {shown} (n={res.get('n')}, {seconds:.1f} s)",
              file=sys.stderr, flush=True)  # fmt: skip
