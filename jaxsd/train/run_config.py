"""A run folder's identity: `config.json`, the `{hash}` in its name, and the resume check.

A rerun must never silently continue a different run. The resolved config is saved as
`<run_dir>/config.json` when a run starts; a resumed run compares its config with it and refuses
with a readable diff when anything but a run-time key changed. The default `run_dir` ends in
`{hash}`, a short hash of the config without its run-time keys, so `--config.seed=1` or
`--config.optim.lr=3e-5` lands in a new folder and an unchanged rerun in the old one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pathlib
from collections.abc import Mapping
from typing import Any

from jaxsd.metrics import flatten_config as flatten

CONFIG_FILE = "config.json"
HASH_FIELD = "{hash}"
# Keys that may differ between a run and its resumption: where and how long it runs, how often
# it evaluates/saves/logs. None of them changes the updates of the steps already taken; every
# other key (seed, lr, model, task, method, ...) does, so it stays in the hash and the check.
# `total_steps` may only grow (a cosine/linear schedule then stretches over the longer run).
RUNTIME_KEYS = (
    "run_dir",
    "resume",
    "total_steps",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "resume_step",  # which checkpoint to continue from
    "log",  # tracker backends (jsonl, tensorboard, wandb, mlflow) and their names
    # Where the processes run and hand weights over, not what they compute (a resumed run may
    # move to another node layout); vLLM's dtype and tensor parallelism change numerics, so
    # they stay.
    "placement",
    "rollout.weights_dir",
    "rollout.vllm.gpu_memory_utilization",
    "rollout.vllm.sleep_between_rollouts",
    "rollout.timeout_s",  # how long to wait for a rollout worker, not what it computes
    "rollout.restart_on_failure",
)


def _is_runtime(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RUNTIME_KEYS)


def config_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON values (what `config.json` holds)."""
    return json.loads(cfg.to_json()) if hasattr(cfg, "to_json") else json.loads(json.dumps(cfg))


def identity(cfg: Any) -> dict[str, Any]:
    """Flat config without its run-time keys: what must match for a run to be continued."""
    return {k: v for k, v in flatten(config_dict(cfg)).items() if not _is_runtime(k)}


def config_hash(cfg: Any) -> str:
    """8 hex digits of the SHA-256 of `identity(cfg)`."""
    blob = json.dumps(identity(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def resolve_run_dir(cfg: Any) -> Any:
    """A copy of `cfg` whose `run_dir` has `{hash}` replaced by `config_hash(cfg)`."""
    if HASH_FIELD not in cfg.run_dir:
        return cfg
    resolved = copy.deepcopy(cfg)
    resolved.run_dir = cfg.run_dir.replace(HASH_FIELD, config_hash(cfg))
    return resolved


def config_diff(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Readable `key: old -> new` lines for every non-run-time key that differs.

    `total_steps` appears only when it shrank (growing it continues the run).
    """
    old_flat, new_flat = flatten(saved), flatten(new)
    lines = []
    for key in sorted(set(old_flat) | set(new_flat)):
        old, now = old_flat.get(key, "<absent>"), new_flat.get(key, "<absent>")
        if old == now:
            continue
        if key == "total_steps" and isinstance(old, int) and isinstance(now, int) and now < old:
            lines.append(f"  total_steps: {old} -> {now} (may only grow)")
        elif not _is_runtime(key):
            lines.append(f"  {key}: {old!r} -> {now!r}")
    return lines


class ConfigMismatchError(ValueError):
    """A resumed run's config differs from the one its folder was started with."""


def _has_checkpoints(run_dir: pathlib.Path) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def prepare_run_dir(cfg: Any, *, is_main_process: bool = True) -> Any:
    """Resolve `run_dir`, refuse a resume whose config differs, and write `config.json`.

    Returns the config to run (run_dir resolved). Called before anything heavy loads, so a
    mismatch costs nothing.
    """
    cfg = resolve_run_dir(cfg)
    path = pathlib.Path(cfg.run_dir) / CONFIG_FILE
    if not cfg.resume and _has_checkpoints(pathlib.Path(cfg.run_dir)):
        return cfg  # the loop refuses this case; keep the old run's config.json intact
    new = config_dict(cfg)
    if cfg.resume and path.is_file():
        saved = json.loads(path.read_text())
        diff = config_diff(saved, new)
        if diff:
            raise ConfigMismatchError(
                f"run_dir={cfg.run_dir!r} holds a run with a different config ({path}):\n"
                + "\n".join(diff)
                + "\nresuming would mix two runs. Pick a new --config.run_dir (or keep the "
                "default, whose name ends in the config hash), or restore the old values; only "
                f"the run-time keys {', '.join(RUNTIME_KEYS)} may change on resume."
            )
    if is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
    return cfg
