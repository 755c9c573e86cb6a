"""Per-step metrics: (sum, count) reduction, pass-rate statistics, JSONL + TensorBoard, progress.

Only process 0 writes (STYLE §18). `<run_dir>/metrics.jsonl` holds one JSON object per step
(`{"step": s, "time": unix_seconds, <name>: value, ...}`), flushed at every write so a crash loses
nothing; a resumed run first drops lines with step > the restored step, so curves never double.
TensorBoard events go to `<run_dir>/tb`; on resume the writer's purge step makes TensorBoard
discard the stale tail of the old event files. The config goes to TensorBoard's text and hparams
tabs; sample completions to `<run_dir>/samples.jsonl` and TensorBoard text; W&B and MLflow
(jaxsd.trackers) get the same scalars, config and samples when `backends` names them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# Metric names the loop writes and the plots read (the train step's own names are "loss",
# "loss/<term>", "grad_norm", "lr", "distill/...", "pg/...").
REWARD = "rollout/reward"
PASS_RATE = "rollout/pass_rate"
FRAC_INTERMEDIATE = "rollout/frac_intermediate"
FRAC_ALL_WRONG = "rollout/frac_all_wrong"
FRAC_ALL_RIGHT = "rollout/frac_all_right"
PASS_RATE_HIST = "rollout/pass_rate_hist"
TOKENS_PER_S = "perf/tokens_per_s"
GRAD_NORM = "grad_norm"
LOSS = "loss"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TB_DIR = "tb"

MetricPairs = Mapping[str, tuple[Any, Any]]


def sum_metric_pairs(pairs: Iterable[MetricPairs]) -> dict[str, tuple[float, float]]:
    """Add (sum, count) pairs name by name (micro-batches, steps, hosts), STYLE §16."""
    total: dict[str, tuple[float, float]] = {}
    for item in pairs:
        for name, (s, c) in item.items():
            s0, c0 = total.get(name, (0.0, 0.0))
            total[name] = (s0 + float(np.asarray(s)), c0 + float(np.asarray(c)))
    return total


def reduce_metric_pairs(pairs: MetricPairs) -> dict[str, float]:
    """Means sum / count; a metric with count 0 (term unused this step) is left out."""
    means = {}
    for name, (s, c) in pairs.items():
        count = float(np.asarray(c))
        if count < 0:
            raise ValueError(f"metric {name!r} has negative count {count}")
        if count > 0:
            means[name] = float(np.asarray(s)) / count
    return means


def pass_rate_stats(pass_rates: Sequence[float]) -> dict[str, float]:
    """Mean pass rate and the fractions of questions with p = 0, 0 < p < 1, p = 1."""
    p = np.asarray(pass_rates, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"pass_rates must be a non-empty 1-D sequence, got shape {p.shape}")
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"pass_rates must lie in [0, 1], got {p.tolist()}")
    return {
        PASS_RATE: float(p.mean()),
        FRAC_ALL_WRONG: float(np.mean(p == 0)),
        FRAC_INTERMEDIATE: float(np.mean((p > 0) & (p < 1))),
        FRAC_ALL_RIGHT: float(np.mean(p == 1)),
    }


def pass_rate_histogram(pass_rates: Sequence[float], group_size: int) -> list[int]:
    """Counts of questions with k = 0..G correct rollouts (k = round(p * G))."""
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    p = np.asarray(pass_rates, dtype=np.float64)
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"pass_rates must lie in [0, 1], got {p.tolist()}")
    k = np.rint(p * group_size).astype(np.int64)
    return np.bincount(k, minlength=group_size + 1).tolist()


def distribution_stats(prefix: str, values: Sequence[float]) -> dict[str, float]:
    """`<prefix>/{mean,std,min,max}` of e.g. question weights or response lengths ({} if empty)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return {}
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{prefix}: values must be finite, got {v.tolist()}")
    return {
        f"{prefix}/mean": float(v.mean()),
        f"{prefix}/std": float(v.std()),
        f"{prefix}/min": float(v.min()),
        f"{prefix}/max": float(v.max()),
    }


def _json_value(name: str, value: Any) -> Any:
    if isinstance(value, list | tuple | np.ndarray):
        return [_json_value(name, v) for v in np.asarray(value).tolist()]
    if isinstance(value, str | bool) or value is None:
        return value
    try:
        number = float(np.asarray(value))
    except (TypeError, ValueError) as err:
        raise ValueError(f"metric {name!r} has a non-numeric value {value!r}") from err
    if isinstance(value, int | np.integer):
        return int(value)
    # Strict JSON has no NaN/inf; null keeps the line parseable and the gap visible.
    return number if math.isfinite(number) else None


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All lines of `<run_dir>/metrics.jsonl` as dicts (a torn last line is ignored)."""
    path = os.path.join(os.fspath(run_dir), METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a jaxsd run folder?")
    rows = []
    with open(path) as fh:
        lines = fh.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a process killed mid-write leaves at most a torn tail
                break
            raise ValueError(f"{path} line {i + 1} is not JSON: {line[:80]!r}") from None
    return rows


def _truncate_after(path: str, step: int) -> int:
    """Keep lines with step <= `step` (and drop a torn tail); return the number dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path) as fh:
        lines = [ln for ln in fh.read().split("\n") if ln.strip()]
    keep = []
    for ln in lines:
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if row.get("step", math.inf) <= step:
            keep.append(ln)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)  # atomic: a crash here leaves the old or the new file, never half
    return len(lines) - len(keep)


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def discard_metrics(run_dir: str | os.PathLike) -> None:
    """Remove the metrics of a run that is starting over (no checkpoint to continue from)."""
    path = os.path.join(os.fspath(run_dir), METRICS_FILE)
    if os.path.exists(path):
        print(f"[jaxsd] no checkpoint in {os.fspath(run_dir)}: starting over, replacing {path}")
        os.remove(path)


class MetricsWriter:
    """JSONL + TensorBoard writer of per-step metrics; a no-op on processes other than 0."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        is_main_process: bool = True,
        resume_step: int | None = None,
        tensorboard: bool = True,
        backends: Sequence[str] = ("jsonl", "tensorboard"),
        config: Mapping[str, Any] | None = None,
        project: str = "jaxsd",
    ) -> None:
        self.run_dir = os.fspath(run_dir)
        self.path = os.path.join(self.run_dir, METRICS_FILE)
        self.samples_path = os.path.join(self.run_dir, SAMPLES_FILE)
        self.active = is_main_process
        self._tb = None
        self._file = None
        self._trackers: list[Any] = []
        if not self.active:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        if resume_step is None:
            if os.path.isfile(self.path) and os.path.getsize(self.path) > 0:
                raise ValueError(
                    f"{self.path} already holds metrics; pass resume_step=<restored step> to "
                    "continue that run, or use a fresh run_dir"
                )
        else:
            _truncate_after(self.path, resume_step)
            _truncate_after(self.samples_path, resume_step)
        self._file = open(self.path, "a")  # noqa: SIM115  (kept open for the run)
        if tensorboard and "tensorboard" in backends:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            # Event file names carry only whole seconds; a unique suffix keeps a quick restart
            # from overwriting the previous file.
            self._tb = SummaryWriter(
                os.path.join(self.run_dir, TB_DIR),
                purge_step=purge,
                filename_suffix=f".{os.getpid()}.{time.time_ns()}",
            )
        from jaxsd.trackers import make_trackers

        self._trackers = make_trackers(
            backends, self.run_dir, config or {}, resumed=resume_step is not None, project=project
        )
        if config is not None and self._tb is not None and resume_step is None:
            self._tb_config(config)

    def _tb_config(self, config: Mapping[str, Any]) -> None:
        """The config as TensorBoard text (full JSON) and hparams (flat scalar values)."""
        from tensorboardX.summary import hparams

        self._tb.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        flat = flatten_config(config)
        hp = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}
        for summary in hparams(hp, {}):
            self._tb.file_writer.add_summary(summary)
        self._tb.flush()

    def write(
        self,
        step: int,
        metrics: Mapping[str, Any],
        *,
        histograms: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        """Append one line for `step` and the matching TensorBoard scalars/histograms."""
        if not self.active:
            return
        if self._file is None:
            raise RuntimeError(f"MetricsWriter for {self.run_dir} is closed")
        row: dict[str, Any] = {"step": int(step), "time": time.time()}
        for name, value in metrics.items():
            if name in row:
                raise ValueError(f"metric name {name!r} is reserved")
            row[name] = _json_value(name, value)
        for name, values in (histograms or {}).items():
            row[name] = _json_value(name, values)
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in row.items():
                if name in ("step", "time") or isinstance(value, list | str | bool):
                    continue
                if value is not None:
                    self._tb.add_scalar(name, value, global_step=int(step))
            for name, values in (histograms or {}).items():
                arr = np.asarray(values, dtype=np.float64)
                if arr.size:
                    self._tb.add_histogram(name, arr, global_step=int(step))
            self._tb.flush()
        if self._trackers:
            scalars = {
                k: v
                for k, v in row.items()
                if k not in ("step", "time") and isinstance(v, int | float)
                and not isinstance(v, bool)
            }  # fmt: skip
            for tracker in self._trackers:
                tracker.log(int(step), scalars)

    def write_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append sample completions (prompt, response, reward, ...) of `step` to samples.jsonl,
        TensorBoard text and the trackers."""
        if not self.active or not rows:
            return
        rows = [{"step": int(step), **r} for r in rows]
        with open(self.samples_path, "a") as fh:
            fh.write("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
        if self._tb is not None:
            text = "\n\n".join(
                "\n".join(f"**{k}**: `{v}`" if k != "response" else f"**{k}**:\n```\n{v}\n```"
                          for k, v in r.items())
                for r in rows
            )  # fmt: skip
            self._tb.add_text("samples", text, global_step=int(step))
            self._tb.flush()
        for tracker in self._trackers:
            tracker.log_samples(int(step), rows)

    def close(self) -> None:
        """Flush and close the files (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Progress:
    """tqdm bar over steps showing reward, pass rate and tokens/s (only on process 0)."""

    def __init__(self, total_steps: int, *, initial_step: int = 0, is_main_process: bool = True):
        self._bar = None
        if is_main_process:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True
            )

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Move the bar to `step` and show the headline metrics of that step."""
        if self._bar is None:
            return
        shown = {}
        for label, name, fmt in (
            ("reward", REWARD, "{:.3f}"),
            ("pass", PASS_RATE, "{:.3f}"),
            ("0<p<1", FRAC_INTERMEDIATE, "{:.2f}"),
            ("tok/s", TOKENS_PER_S, "{:.0f}"),
        ):
            value = metrics.get(name)
            if value is not None:
                shown[label] = fmt.format(float(value))
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(max(0, int(step) - self._bar.n))

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
