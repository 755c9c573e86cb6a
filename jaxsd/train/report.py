"""The end-of-run summary a user reads: start vs end held-out eval, wall time, plot path."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

from jaxsd.metrics import read_metrics

_HEADLINE = ("mean@", "maj@", "best@")


def summary_rows(summary: Mapping[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """(metric, start, end) for the averaged eval metrics (`eval/<metric>` keys)."""
    start = summary.get("eval_start") or {}
    end = summary.get("eval_end") or {}
    names = sorted(
        {k for k in (*start, *end) if k.count("/") == 1 and k.split("/")[1].startswith(_HEADLINE)}
    )
    return [(name, start.get(name), end.get(name)) for name in names]


def format_summary(summary: Mapping[str, Any]) -> str:
    """A small fixed-width table plus wall time and the plot path."""
    lines = [
        f"run: {summary.get('run_dir')}  steps {summary.get('start_step')} -> "
        f"{summary.get('end_step')}  wall {summary.get('wall_s', 0.0):.0f} s"
    ]
    rows = summary_rows(summary)
    if rows:
        lines.append(f"{'held-out':<18}{'start':>10}{'end':>10}{'change':>10}")
        for name, s, e in rows:
            fmt = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
            delta = "-" if s is None or e is None else f"{100 * (e - s):+.1f}"
            lines.append(f"{name.removeprefix('eval/'):<18}{fmt(s):>10}{fmt(e):>10}{delta:>10}")
    if summary.get("plot"):
        lines.append(f"plots: {summary['plot']}")
    return "\n".join(lines)


def print_summary(summary: Mapping[str, Any]) -> None:
    print(format_summary(summary), flush=True)


def finish_summary(summary: dict[str, Any], run_dir: pathlib.Path) -> dict[str, Any]:
    """Start vs end evaluation from the whole run's log (a resumed run too) and the plots."""
    from jaxsd.plots import plot_run

    evals = [r for r in read_metrics(run_dir) if any(k.startswith("eval/") for k in r)]
    if evals:
        summary["eval_start"] = {k: v for k, v in evals[0].items() if k.startswith("eval/")}
        summary["eval_end"] = {k: v for k, v in evals[-1].items() if k.startswith("eval/")}
    summary["plot"] = plot_run(run_dir)
    return summary


def print_interrupted(step: int, saved_in: str | None) -> None:
    """What Ctrl-C left behind and how to go on."""
    saved = f"saved in {saved_in}" if saved_in else "nothing new to save"
    print(f"[jaxsd] stopped by Ctrl-C at step {step} ({saved}); run the same command again "
          "to continue", flush=True)  # fmt: skip
