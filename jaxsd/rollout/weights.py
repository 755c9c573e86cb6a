"""Weights travel from the trainer to rollout workers as Orbax checkpoints.

The trainer publishes a flat dict keyed by Hugging Face tensor names under
`<weights_dir>/<step>`. Orbax writes into a temporary folder and renames it when complete (on
object stores it writes a commit marker instead), so a reader never sees a half-written step.
Workers restore on host as numpy and hand the tensors to their engine.

The save is tuned for the exchange being bounded by disk bandwidth (bench/weight_exchange.py
measures it): no zstd compression (fp32 weights barely compress, and compressing multiplies
the save time), no defensive copy of numpy inputs (the save is synchronous, so the caller
cannot change them mid-write), and by default no fsync of the tensor data (on a local disk
it is a large share of the save time). The exchange is a transport, not a record: a
reader on the same host reads the page cache, NFS flushes at close, object stores have no
fsync, and after a machine crash the trainer republishes the step it resumes from before any
rollout (train/loop.py), so a step lost with the page cache is never served. The train
checkpoint, which is the record, keeps Orbax's fsync. Pass `fsync=True` for a step that must
survive power loss by itself. OCDBT stays on: a step is a handful of large files, which
shared storage prefers to one folder per tensor. Readers need no options: Orbax reads the
format from the checkpoint, so steps published with the old defaults still restore.
"""

from __future__ import annotations

import copy
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np


class CheckpointRestoreError(RuntimeError):
    """A published weights step could not be read back."""


def step_path(weights_dir: str | os.PathLike, step: int) -> pathlib.Path:
    """The folder of weights step `step`."""
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    return pathlib.Path(weights_dir) / str(int(step))


def _is_finalized(path: pathlib.Path) -> bool:
    import orbax.checkpoint as ocp

    return path.is_dir() and ocp.utils.is_checkpoint_finalized(path)


def published_steps(weights_dir: str | os.PathLike) -> list[int]:
    """Fully written weights steps in `weights_dir`, ascending (empty when none)."""
    root = pathlib.Path(weights_dir)
    if not root.is_dir():
        return []
    steps = [int(p.name) for p in root.iterdir() if p.name.isdigit() and _is_finalized(p)]
    return sorted(steps)


def latest_step(weights_dir: str | os.PathLike) -> int | None:
    """The newest fully written weights step, or None when nothing was published yet."""
    steps = published_steps(weights_dir)
    return steps[-1] if steps else None


def _host_or_device_array(name: str, value: Any) -> Any:
    import jax

    if isinstance(value, jax.Array):  # sharded trainer params: every process saves its shard
        return value
    arr = np.asarray(value)
    if arr.dtype == object:
        raise TypeError(f"tensor {name!r} is not a numeric array (got {type(value).__name__})")
    return arr


class _UnsyncedContexts:
    """One child of each save's TensorStore context with `file_io_sync` off.

    Both type handlers of a save share it, so all of the save's OCDBT writes keep going
    through one kvstore (one context), as with Orbax's own context.
    """

    def __init__(self) -> None:
        self._parent = None
        self._child = None

    def __call__(self, parent):
        import tensorstore as ts

        if parent is not self._parent:
            spec = ts.Context.Spec({"file_io_sync": False})
            self._parent, self._child = parent, ts.Context(spec, parent)
        return self._child


def _without_fsync(handler_cls: type, contexts: _UnsyncedContexts, **kwargs: Any):
    """An instance of Orbax type handler `handler_cls` that writes without fsync."""

    class Unsynced(handler_cls):
        async def serialize(self, values, infos, args=None):
            unsynced = []
            for info in infos:
                info = copy.copy(info)
                info.ts_context = contexts(info.ts_context)
                unsynced.append(info)
            return await super().serialize(values, unsynced, args)

    return Unsynced(**kwargs)


def _checkpointer(fsync: bool):
    """A synchronous Orbax PyTree checkpointer with the exchange's save options (see top)."""
    import jax
    import orbax.checkpoint as ocp

    handlers = ocp.type_handlers
    if fsync:
        numpy_handler = handlers.NumpyHandler(deepcopy_host_arrays=False)
        array_handler = handlers.ArrayHandler()
    else:
        contexts = _UnsyncedContexts()
        numpy_handler = _without_fsync(handlers.NumpyHandler, contexts, deepcopy_host_arrays=False)
        array_handler = _without_fsync(handlers.ArrayHandler, contexts)
    registry = handlers.create_type_handler_registry(
        (np.ndarray, numpy_handler), (jax.Array, array_handler)
    )
    handler = ocp.PyTreeCheckpointHandler(
        use_ocdbt=True, use_compression=False, type_handler_registry=registry
    )
    return ocp.Checkpointer(handler)


def publish_weights(
    hf_state_dict: Mapping[str, Any],
    weights_dir: str | os.PathLike,
    step: int,
    *,
    keep: int = 3,
    fsync: bool = False,
) -> pathlib.Path:
    """Save HF-named tensors as weights step `step` (atomic); keep it and the `keep`-1 before it.

    Steps newer than `step` are removed: they belong to a run that was rewound (resumed from
    an earlier checkpoint), and a worker following the folder must not pick them up.
    Re-publishing an existing step replaces it. Values may be numpy or (sharded) jax arrays;
    with sharded arrays every process of a multi-host run calls this (each saves its shards).
    `fsync=False` leaves the tensor data in the page cache for the OS to write back (see top).
    """
    import jax
    import orbax.checkpoint as ocp

    if keep < 1:
        raise ValueError(f"keep={keep} must be >= 1 (a worker needs the step it loads)")
    if not hf_state_dict:
        raise ValueError("hf_state_dict is empty; pass to_hf_state_dict(model, config)")
    bad = [k for k in hf_state_dict if not isinstance(k, str) or not k]
    if bad:
        raise TypeError(f"hf_state_dict keys must be HF tensor names (str), got {bad[:3]}")
    tree = {name: _host_or_device_array(name, v) for name, v in hf_state_dict.items()}
    path = step_path(weights_dir, step).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _checkpointer(fsync) as checkpointer:
        checkpointer.save(path, args=ocp.args.PyTreeSave(tree), force=True)
    if jax.process_index() == 0:
        steps = published_steps(weights_dir)
        newer = [s for s in steps if s > step]
        for old in newer + [s for s in steps if s <= step][:-keep]:
            shutil.rmtree(step_path(weights_dir, old), ignore_errors=True)
    return path


def restore_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The flat HF-named dict saved at `path`, as host numpy arrays."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    if not _is_finalized(path):
        raise CheckpointRestoreError(
            f"no finished weights checkpoint at {path}; publish it with publish_weights() "
            f"(published steps: {published_steps(path.parent)})"
        )
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            tree = checkpointer.metadata(path).item_metadata.tree
            restore_args = {name: ocp.RestoreArgs(restore_type=np.ndarray) for name in tree}
            state = checkpointer.restore(
                path, args=ocp.args.PyTreeRestore(restore_args=restore_args)
            )
    except Exception as e:  # Orbax/TensorStore raise many types; the cause is kept
        raise CheckpointRestoreError(
            f"weights checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
            "re-publish the step"
        ) from e
    if not isinstance(state, dict) or any(not isinstance(v, np.ndarray) for v in state.values()):
        raise CheckpointRestoreError(
            f"weights checkpoint {path} is not a flat dict of HF-named arrays; "
            "it was not written by publish_weights()"
        )
    return state


def restore_weights(weights_dir: str | os.PathLike, step: int) -> dict[str, np.ndarray]:
    """The HF-named tensors published as weights step `step`, on host."""
    return restore_checkpoint(step_path(weights_dir, step))


class WeightsDirError(ValueError):
    """`rollout.weights_dir` cannot hold the published steps; names the fix."""


RAM_ROOT = "/dev/shm"


def resolve_weights_dir(
    setting: str,
    run_dir: str | os.PathLike,
    *,
    bytes_per_step: int,
    keep: int,
    num_processes: int = 1,
    ram_root: str | os.PathLike = RAM_ROOT,
) -> tuple[pathlib.Path, bool]:
    """Where to publish weights steps -> (folder, in_ram).

    setting "auto": a per-run folder in RAM (`/dev/shm`, tmpfs) when one process publishes and
    it has room for `keep` + 1 steps (the one being written); a step then never touches the
    disk, while the durable train checkpoint stays in the run folder. Multi-process runs need
    storage every host sees, so they publish to the run folder. "run": `<run_dir>/weights`.
    Anything else: that folder.
    """
    run_weights = pathlib.Path(run_dir).absolute() / "weights"
    if setting == "run" or (setting == "auto" and num_processes > 1):
        return run_weights, False
    if setting != "auto":
        return pathlib.Path(setting).absolute(), False
    root = pathlib.Path(ram_root)
    if not root.is_dir():
        raise WeightsDirError(
            f"rollout.weights_dir='auto' publishes weights to RAM ({root}), which this machine "
            "does not have; set --config.rollout.weights_dir=run (the run folder) or a folder"
        )
    need = (keep + 1) * bytes_per_step
    free = shutil.disk_usage(root).free
    if free < need:
        raise WeightsDirError(
            f"rollout.weights_dir='auto': {root} has {free / 2**30:.2f} GiB free, but publishing "
            f"needs {need / 2**30:.2f} GiB ({keep} kept steps + 1 being written, "
            f"{bytes_per_step / 2**30:.2f} GiB each); set --config.rollout.weights_dir=run "
            f"(the run folder on disk), or enlarge {root}"
        )
    import hashlib

    tag = hashlib.sha1(str(pathlib.Path(run_dir).absolute()).encode()).hexdigest()[:12]
    return root / f"jaxsd-{tag}" / "weights", True
