"""Optional experiment trackers beside metrics.jsonl and TensorBoard: Weights & Biases, MLflow.

`--config.log.backends=jsonl,tensorboard,wandb,mlflow` picks them (jsonl is always written:
plots, resume and compare read it). Both work without a network: `WANDB_MODE=offline` keeps
W&B's files under `<run_dir>/wandb` for a later `wandb sync`; MLflow logs to
`MLFLOW_TRACKING_URI`, by default the file store `<run_dir>/mlruns` (`mlflow ui
--backend-store-uri <run_dir>/mlruns`). A resumed run appends to the same tracker run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from jaxsd.metrics import flatten_config

BACKENDS = ("jsonl", "tensorboard", "wandb", "mlflow")
EXTERNAL = ("wandb", "mlflow")
_MLFLOW_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def _run_id(run_dir: str) -> str:
    """A stable tracker run id per run folder, so a resumed run continues its tracker run."""
    return hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:16]


def _missing(name: str, err: ImportError) -> ImportError:
    return ImportError(
        f"log.backends names {name!r} but it is not installed ({err}); "
        f"pip install 'jaxsd[trackers]' or drop {name} from --config.log.backends"
    )


class WandbTracker:
    """Scalars via `wandb.log`, sample completions as a `wandb.Table`."""

    def __init__(self, run_dir: str, config: Mapping[str, Any], project: str) -> None:
        try:
            import wandb
        except ImportError as err:
            raise _missing("wandb", err) from err
        self._wandb = wandb
        self._run = wandb.init(
            project=project,
            dir=run_dir,
            name=os.path.basename(os.path.normpath(run_dir)),
            id=_run_id(run_dir),
            resume="allow",
            config=dict(config),
        )

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self._run.log(dict(scalars), step=step)

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        columns = list(rows[0])
        table = self._wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
        self._run.log({"samples": table}, step=step)

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    """Metrics via `MlflowClient.log_batch`, the config as params, samples as JSON artifacts."""

    def __init__(
        self, run_dir: str, config: Mapping[str, Any], project: str, *, resumed: bool
    ) -> None:
        try:
            import mlflow
            from mlflow.entities import Metric, Param
        except ImportError as err:
            raise _missing("mlflow", err) from err
        self._metric_cls = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = _file_uri(os.path.join(run_dir, "mlruns"))
            # MLflow 3 keeps its file store (no database dependency) behind this opt-in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = mlflow.MlflowClient(tracking_uri=uri)
        exp = self._client.get_experiment_by_name(project)
        exp_id = exp.experiment_id if exp else self._client.create_experiment(project)
        tag = _run_id(run_dir)
        found = self._client.search_runs([exp_id], filter_string=f"tags.jaxsd_run = '{tag}'")
        if found:
            self.run_id = found[0].info.run_id
        else:
            name = os.path.basename(os.path.normpath(run_dir))
            run = self._client.create_run(exp_id, run_name=name, tags={"jaxsd_run": tag})
            self.run_id = run.info.run_id
        if not resumed:  # MLflow params are write-once; a resume keeps the first run's
            params = [Param(k, json.dumps(v)[:6000]) for k, v in flatten_config(config).items()]
            for i in range(0, len(params), 100):  # log_batch takes at most 100 params
                self._client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric_cls(mlflow_key(k), float(v), now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):
            self._client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        self._client.log_text(self.run_id, json.dumps(list(rows), indent=1), f"samples/{step}.json")

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


def mlflow_key(name: str) -> str:
    """MLflow keys allow only [A-Za-z0-9_-. /]: "eval/mean@16" -> "eval/mean_at_16"."""
    return _MLFLOW_BAD.sub("_", name.replace("@", "_at_"))


def _file_uri(path: str) -> str:
    return "file://" + os.path.abspath(path)


def make_trackers(
    names: Sequence[str],
    run_dir: str,
    config: Mapping[str, Any],
    *,
    resumed: bool,
    project: str = "jaxsd",
) -> list[Any]:
    """The external trackers among `names` (jsonl/tensorboard are MetricsWriter's own)."""
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown log backends {unknown}; choose from {BACKENDS}")
    trackers: list[Any] = []
    if "wandb" in names:
        trackers.append(WandbTracker(run_dir, config, project))
    if "mlflow" in names:
        trackers.append(MlflowTracker(run_dir, config, project, resumed=resumed))
    return trackers
