"""Checkpoints of a run: the train state pytree plus a JSON item of host-side state (DESIGN §5).

Layout: ``<run_dir>/checkpoints/<step>/{state,host}`` written by one Orbax ``CheckpointManager``.
Orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it only when every
file is on disk, so a save cut short by SIGKILL never shows up as a step. A finalised step that
fails to restore (a truncated or corrupt file, missing metadata) is skipped with a warning and
the previous one is used; once an older step restores, the bad one is moved to
``<run_dir>/corrupt_checkpoints/`` so that the resumed run can save that step number again.

Bit rot restores without an error, so once a step is finalised its files' SHA-256 sums are
written into the step itself (``<step>/checksums.json``, atomically) and checked before the
step is read: a mismatch counts as damage like a truncated file. Recording reads the step back
once; it runs when the next save starts, on `wait()` and on `close()`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

_STATE = "state"
_HOST = "host"
CHECKSUMS = "checksums.json"
_READ_BYTES = 1 << 22


class ChecksumError(ValueError):
    """A checkpoint file's bytes differ from the checksum recorded when it was saved."""


def _step_files(step_dir: str) -> list[str]:
    """Every file of a step folder (relative paths, sorted), except the checksum record."""
    files = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != CHECKSUMS:
                files.append(rel)
    return sorted(files)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_all(step_dir: str, files: list[str]) -> dict[str, str]:
    """{file: sha256}, files hashed side by side (hashlib releases the GIL on large reads)."""
    workers = max(1, min(8, os.cpu_count() or 1, len(files)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        digests = pool.map(lambda rel: _sha256(os.path.join(step_dir, rel)), files)
        return dict(zip(files, digests, strict=True))


def record_checksums(step_dir: str) -> None:
    """Write `<step_dir>/checksums.json`: {relative file path: sha256}, via an atomic rename."""
    sums = _sha256_all(step_dir, _step_files(step_dir))
    tmp = os.path.join(step_dir, f".{CHECKSUMS}.tmp")
    with open(tmp, "w") as f:
        json.dump(sums, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, CHECKSUMS))


def verify_checksums(step_dir: str) -> bool:
    """Raise ChecksumError naming the first damaged or missing file; False when none recorded."""
    path = os.path.join(step_dir, CHECKSUMS)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        sums = json.load(f)
    for rel in sorted(sums):
        if not os.path.exists(os.path.join(step_dir, rel)):
            raise ChecksumError(f"{os.path.join(step_dir, rel)} is missing (it was saved with it)")
    actual = _sha256_all(step_dir, sorted(sums))
    for rel, expected in sorted(sums.items()):
        if actual[rel] != expected:
            raise ChecksumError(
                f"{os.path.join(step_dir, rel)} does not match the checksum recorded when it was "
                "saved"
            )
    return True


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped or moved aside during restore."""


def _json_path_error(value: Any, path: str) -> str | None:
    """First place where `value` would not survive a JSON round trip unchanged, or None."""
    if value is None or isinstance(value, bool | str):
        return None
    if isinstance(value, int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} = {value} is not finite"
    if isinstance(value, list):
        for i, item in enumerate(value):
            err = _json_path_error(item, f"{path}[{i}]")
            if err:
                return err
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} has key {key!r} of type {type(key).__name__}; use str keys"
            err = _json_path_error(item, f"{path}[{key!r}]")
            if err:
                return err
        return None
    hint = "use a list" if isinstance(value, tuple) else "convert it (e.g. .tolist(), float())"
    return f"{path} has type {type(value).__name__}, which JSON changes or rejects; {hint}"


def validate_host_state(host_state: Mapping[str, Any]) -> None:
    """Raise ValueError unless `host_state` round-trips through JSON exactly (str keys, lists)."""
    if not isinstance(host_state, dict):
        raise ValueError(f"host_state must be a dict, got {type(host_state).__name__}")
    err = _json_path_error(host_state, "host_state")
    if err:
        raise ValueError(f"host_state is not exactly JSON-serialisable: {err}")


def _abstract_leaf(path: tuple, leaf: Any) -> jax.ShapeDtypeStruct:
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        if leaf.sharding is None:
            raise ValueError(
                f"abstract_train_state leaf {jax.tree_util.keystr(path)} has no sharding; give "
                "it one, e.g. jax.sharding.SingleDeviceSharding(jax.devices()[0])"
            )
        return leaf
    raise ValueError(
        f"abstract_train_state leaf {jax.tree_util.keystr(path)} is a {type(leaf).__name__}; "
        "expected jax.ShapeDtypeStruct with .sharding (or a jax.Array)"
    )


class Checkpointer:
    """Saves and restores (train_state, host_state) per step with Orbax; keeps the latest N."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        async_save: bool = True,
        best_metric: str | None = None,
        best_mode: str = "max",
        keep_best: int = 1,
    ) -> None:
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep} must be >= 1 (resume needs a checkpoint)")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode={best_mode!r} must be 'max' or 'min'")
        self.run_dir = os.path.abspath(os.fspath(run_dir))  # Orbax needs absolute paths
        self.directory = os.path.join(self.run_dir, "checkpoints")
        self.best_metric = best_metric
        policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
        best_fn = None
        if best_metric is not None:
            best_fn = lambda metrics: float(metrics[best_metric])
            # Steps saved without the metric are kept only by LatestN, so keep-N still holds.
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=best_fn,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=(_STATE, _HOST), options=options
        )
        self._unsummed: list[int] = []  # saved steps whose checksums are not written yet

    def save(
        self,
        step: int,
        train_state: Any,
        host_state: dict,
        *,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Start saving `step` (async); every process calls it and writes its own shards."""
        validate_host_state(host_state)
        if self.best_metric is not None and metrics is not None and self.best_metric not in metrics:
            raise ValueError(
                f"metrics has no {self.best_metric!r} (best_metric); got keys {sorted(metrics)}"
            )
        if step in self._manager.all_steps():
            raise ValueError(f"step {step} already has a checkpoint in {self.directory}")
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(train_state), _HOST: ocp.args.JsonSave(host_state)}
        )
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        self._record_pending_checksums()
        saved = self._manager.save(step, args=args, metrics=metrics, force=force)
        if saved:
            self._unsummed.append(step)
        return saved

    def _record_pending_checksums(self) -> None:
        """Wait for the async saves in flight, then checksum every step they finalised."""
        if not self._unsummed:
            return
        self._manager.wait_until_finished()
        steps, self._unsummed = self._unsummed, []
        if jax.process_index() != 0:
            return
        for step in steps:
            step_dir = os.path.join(self.directory, str(step))
            if os.path.isdir(step_dir):  # a preservation policy may already have dropped it
                record_checksums(step_dir)

    def latest_step(self) -> int | None:
        """Newest finalised step on disk, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Finalised steps on disk, ascending."""
        return sorted(self._manager.all_steps())

    def will_resume(self, resume: bool, resume_step: int | None) -> bool:
        """Whether a run with these `resume` / `resume_step` settings restores a checkpoint;
        refuses to overwrite checkpoints without `resume` or to go back to a missing one."""
        if resume and self.latest_step() is not None:
            return True
        if self.latest_step() is not None:
            raise FileExistsError(
                f"{self.directory} already holds checkpoints and resume=False; pass "
                "--config.resume=True to continue the run or pick a new --config.run_dir"
            )
        if resume_step is not None:
            raise ValueError(
                f"config resume_step={resume_step} needs resume=True and a checkpoint in "
                f"{self.directory}; have {self.all_steps()}"
            )
        return False

    def best_step(self) -> int | None:
        """Step with the best `best_metric` (latest step when no metric is tracked)."""
        return self._manager.best_step()

    def _restore_step(self, step: int, abstract: Any) -> tuple[Any, dict]:
        step_dir = os.path.join(self.directory, str(step))
        if not verify_checksums(step_dir):
            warnings.warn(
                f"checkpoint step {step} in {self.directory} has no {CHECKSUMS} (the run "
                "stopped before recording it); restoring it unverified",
                CheckpointWarning,
                stacklevel=3,
            )
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(abstract), _HOST: ocp.args.JsonRestore()}
        )
        restored = self._manager.restore(step, args=args)
        host_state = restored[_HOST]
        if not isinstance(host_state, dict):
            raise ValueError(f"host item is a {type(host_state).__name__}, expected a dict")
        return restored[_STATE], host_state

    def restore(
        self, step: int | None = None, *, abstract_train_state: Any
    ) -> tuple[Any, dict, int]:
        """Restore onto the shardings of `abstract_train_state`; fall back past corrupt steps.

        With `step` given, restore exactly that step (no fallback). Returns
        (train_state, host_state, step).
        """
        self.wait()
        self._manager.reload()
        abstract = jax.tree_util.tree_map_with_path(_abstract_leaf, abstract_train_state)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"no checkpoint in {self.directory}; start fresh (resume=False) or pick a run_dir "
                "that has one"
            )
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(
                    f"resume step {step} is not in {self.directory}; have {steps}"
                )
            train_state, host_state = self._restore_step(step, abstract)
            return train_state, host_state, step
        failures: list[tuple[int, str]] = []
        for candidate in reversed(steps):
            try:
                train_state, host_state = self._restore_step(candidate, abstract)
            except Exception as err:  # any failure to read a step means: try the previous one
                reason = f"{type(err).__name__}: {str(err)[:500]}"
                failures.append((candidate, reason))
                warnings.warn(
                    f"checkpoint step {candidate} in {self.directory} failed to restore "
                    f"({reason}); falling back to the previous step",
                    CheckpointWarning,
                    stacklevel=2,
                )
                continue
            self._quarantine([s for s, _ in failures])
            return train_state, host_state, candidate
        detail = "; ".join(f"step {s}: {r}" for s, r in failures)
        raise RuntimeError(f"no checkpoint in {self.directory} could be restored ({detail})")

    def set_aside_after(self, step: int) -> list[int]:
        """Move the steps newer than `step` to `<run_dir>/superseded_checkpoints/` (kept, not
        deleted), so a run resumed from `step` can save those step numbers again."""
        newer = [s for s in self.all_steps() if s > step]
        self._move_aside(newer, "superseded_checkpoints", f"newer than resumed step {step}")
        return newer

    def _quarantine(self, bad_steps: list[int]) -> None:
        """Move steps newer than a good one aside, so their step numbers can be saved again."""
        self._move_aside(bad_steps, "corrupt_checkpoints", "unreadable")

    def _move_aside(self, steps: list[int], folder: str, why: str) -> None:
        if not steps:
            return
        target_root = os.path.join(self.run_dir, folder)
        if jax.process_index() == 0:
            os.makedirs(target_root, exist_ok=True)
            for step in steps:
                target = os.path.join(target_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(os.path.join(self.directory, str(step)), target)
                warnings.warn(
                    f"moved checkpoint step {step} ({why}) to {target}",
                    CheckpointWarning,
                    stacklevel=4,
                )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxsd_checkpoint_quarantine")
        self._manager.reload()

    def wait(self) -> None:
        """Block until pending async saves are on disk."""
        self._manager.wait_until_finished()
        self._record_pending_checksums()

    def close(self) -> None:
        """Finish pending saves, checksum them and release Orbax's threads."""
        try:
            self._record_pending_checksums()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
