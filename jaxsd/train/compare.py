"""Several methods x seeds on the same preset and budget, one pass-rate plot (issue "embedded
default learns"). Each run is an ordinary run folder `<out>/<method>_s<seed>`, so an interrupted
comparison resumes run by run."""

from __future__ import annotations

import ast
import importlib.util
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxsd.metrics import read_metrics
from jaxsd.plots import plot_runs

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_config(method: str, preset: str = ""):
    """`configs/<method>.py:get_config(preset)`."""
    path = REPO_ROOT / "configs" / f"{method}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no config {path}; methods are the file names in configs/")
    spec = importlib.util.spec_from_file_location(f"jaxsd_config_{method}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def final_eval(run_dir: str | pathlib.Path, metric: str) -> float | None:
    """The last logged value of `metric` in a run folder (None when never logged)."""
    values = [r[metric] for r in read_metrics(run_dir) if r.get(metric) is not None]
    return values[-1] if values else None


def first_eval(run_dir: str | pathlib.Path, metric: str) -> float | None:
    values = [r[metric] for r in read_metrics(run_dir) if r.get(metric) is not None]
    return values[0] if values else None


def last_evals(run_dir: str | pathlib.Path) -> dict[str, float]:
    """Every `eval/...` value of the run's last evaluation (per-band metrics included)."""
    rows = [r for r in read_metrics(run_dir) if any(k.startswith("eval/") for k in r)]
    return {k: v for k, v in rows[-1].items() if k.startswith("eval/")} if rows else {}


def is_finished(run_dir: str | pathlib.Path, total_steps: int, metric: str) -> bool:
    """The run logged `metric` at `total_steps` (so rerunning the comparison skips it)."""
    if not (pathlib.Path(run_dir) / "metrics.jsonl").is_file():
        return False
    rows = read_metrics(run_dir)
    return any(r.get("step") == total_steps and r.get(metric) is not None for r in rows)


def progress_line(done: int, total: int, label: str, trained_s: Sequence[float]) -> str:
    """`[3/40] sdpo_s2 (2 trained, 95 s each, ~59 min left)`: what runs next and the ETA."""
    if not trained_s:
        return f"[{done + 1}/{total}] {label}"
    each = float(np.mean(trained_s))
    left = each * (total - done) / 60
    eta = f"{len(trained_s)} trained, {each:.0f} s each, ~{left:.0f} min left"
    return f"[{done + 1}/{total}] {label} ({eta})"


# Per-step metric families the loop logs (metrics.jsonl keys, before any "/").
_STEP_PREFIXES = ("rollout/", "loss", "grad_norm", "lr", "entropy", "distill/", "pg/", "kl/",
                  "ssopd/", "rhythm/", "algo/", "perf/", "time/", "mem/", "epoch")  # fmt: skip


def check_metric(metric: str, cfg: Any) -> None:
    """Fail before any training when `metric` is not one the config's runs will log.

    Held-out metrics are `eval/{mean,maj,best}@<rollout.eval_n>` (averaged over tasks),
    `eval/mean_reward` and `eval/<task.name>/...`; they need `eval_every` > 0.
    """
    n, task = cfg.rollout.eval_n, cfg.task.name
    heads = [f"mean@{n}", f"maj@{n}", f"best@{n}", "mean_reward"]
    evals = [f"eval/{h}" for h in heads] + [f"eval/{task}/{h}" for h in heads]
    if metric.startswith("eval/"):
        # a banded task (jaxsd.tasks.miniature) also logs `<metric>/band=<band>`
        if metric.split("/band=")[0] not in evals:
            raise ValueError(
                f"--metric {metric!r} is not logged by preset {cfg.get('preset')!r} "
                f"(rollout.eval_n={n}, task {task!r}); it logs {evals}"
            )
        if not cfg.eval_every:
            raise ValueError(f"--metric {metric!r} needs evaluations but eval_every=0")
    elif not metric.startswith(_STEP_PREFIXES):
        raise ValueError(
            f"--metric {metric!r} is not a metric the loop logs; use one of {evals} or a "
            f"per-step metric such as rollout/pass_rate (prefixes {_STEP_PREFIXES})"
        )


def compare(
    methods: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | pathlib.Path,
    *,
    preset: str = "",
    overrides: dict[str, Any] | None = None,
    metric: str = "eval/mean@16",
) -> dict[str, Any]:
    """Train every (method, seed); return start/end `metric` per run and mean/std per method."""
    from jaxsd.train.loop import train

    out_dir = pathlib.Path(out_dir)
    for method in methods:  # every config and the metric checked before anything trains
        cfg = load_config(method, preset)
        for key, value in (overrides or {}).items():
            _set(cfg, key, value)
        check_metric(metric, cfg)
    runs: dict[str, dict[str, Any]] = {}
    trained_s: list[float] = []
    for k, (method, seed) in enumerate((m, s) for m in methods for s in seeds):
        cfg = load_config(method, preset)
        cfg.seed = seed
        cfg.run_dir = str(out_dir / f"{method}_s{seed}")
        for key, value in (overrides or {}).items():
            _set(cfg, key, value)
        label = f"{method}_s{seed}"
        if is_finished(cfg.run_dir, cfg.total_steps, metric):  # resumable run by run
            print(f"[{k + 1}/{len(methods) * len(seeds)}] {label}: finished before", flush=True)
        else:
            print(progress_line(k, len(methods) * len(seeds), label, trained_s), flush=True)
            t0 = time.perf_counter()
            train(cfg)
            trained_s.append(time.perf_counter() - t0)
        runs[label] = {
            "method": method,
            "seed": seed,
            "start": first_eval(cfg.run_dir, metric),
            "end": final_eval(cfg.run_dir, metric),
            "ends": last_evals(cfg.run_dir),
            "run_dir": cfg.run_dir,
        }
    summary = {"metric": metric, "runs": runs, "methods": {}}
    for method in methods:
        ends = [r["end"] for r in runs.values() if r["method"] == method and r["end"] is not None]
        starts = [
            r["start"] for r in runs.values() if r["method"] == method and r["start"] is not None
        ]
        summary["methods"][method] = {
            "end_mean": float(np.mean(ends)) if ends else None,
            "end_std": float(np.std(ends)) if ends else None,
            "start_mean": float(np.mean(starts)) if starts else None,
            "n": len(ends),
        }
    dirs = [r["run_dir"] for r in runs.values()]
    groups = [r["method"] for r in runs.values()]
    summary["plot_pass_rate"] = plot_runs(
        dirs, out_dir / "pass_rate.png", "rollout/pass_rate", labels=list(runs), groups=groups
    )
    summary["plot_eval"] = plot_runs(
        dirs, out_dir / "eval.png", metric, labels=list(runs), groups=groups
    )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _set(cfg: Any, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for name in parents:
        node = node[name]
    if leaf not in node:
        raise KeyError(f"config has no key {dotted!r}")
    if hasattr(node[leaf], "keys"):  # a section such as task.kwargs: a Python dict literal
        node[leaf] = ast.literal_eval(value) if isinstance(value, str) else dict(value)
    else:
        node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
