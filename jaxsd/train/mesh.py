"""Device mesh from config: axes (`data`, `fsdp`, `tensor`), sizes -1 = fill (DESIGN §3)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsd.models.sharding import DEFAULT_RULES, Rules, logical_to_mesh_spec

__all__ = [
    "AXES",
    "batch_sharding",
    "distributed_args",
    "initialize_distributed",
    "maybe_initialize_distributed",
    "make_mesh",
    "replicated",
    "resolve_mesh_shape",
]

AXES = ("data", "fsdp", "tensor")
_AUTO = (jax.sharding.AxisType.Auto,) * len(AXES)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replace the (at most one) -1 by whatever fills `num_devices`; check the product."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(AXES):
        raise ValueError(f"mesh shape {shape} must give one size per axis {AXES}")
    fills = [i for i, s in enumerate(shape) if s == -1]
    if len(fills) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be >= 1, with at most one -1 (fill)")
    known = math.prod(s for s in shape if s != -1)
    if fills:
        if num_devices % known:
            raise ValueError(f"mesh shape {shape} cannot fill {num_devices} devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh shape {shape} uses {math.prod(shape)} devices but {num_devices} are present; "
            "set one axis to -1 to fill"
        )
    return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence | None = None) -> Mesh:
    """A `Mesh` over all (or the given) devices with axes `data`, `fsdp`, `tensor`."""
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_mesh_shape(shape, len(devices))
    if len(devices) == len(jax.devices()):
        # jax.make_mesh orders devices so that each host's devices form contiguous blocks
        # (process-local batch rows then map to one block) and respects the ICI topology.
        # Auto axes: GSPMD propagates shardings through gathers (explicit axes would demand an
        # out_sharding at every take/take_along_axis in the model and head).
        return jax.make_mesh(resolved, AXES, axis_types=_AUTO, devices=devices)
    return Mesh(np.asarray(devices).reshape(resolved), AXES, axis_types=_AUTO)


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """A batch field [B] or [B, T]: B by the `batch` rule (by default every data-parallel axis,
    fsdp included), T by the `length` rule (replicated by default)."""
    logical = ("batch", "length", *([None] * max(ndim - 2, 0)))[:ndim]
    return NamedSharding(mesh, logical_to_mesh_spec(logical, rules, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str | None = None,
) -> None:
    """`jax.distributed.initialize` for multi-host runs (no-op args -> cluster auto-detect).

    On CPU hosts cross-process collectives need an implementation (`"gloo"`); GPUs and TPUs
    bring their own. Call once per process before any other JAX call.
    """
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


DISTRIBUTED_ENV = "JAXSD_DISTRIBUTED"  # "1": always join (TPU pods), "0": never, unset: detect


def distributed_args(env: Mapping[str, str] = os.environ) -> dict | None:
    """`initialize_distributed` arguments when the environment says this process is one of
    many, else None.

    Explicit: JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID. Detected (JAX then
    reads the cluster itself): SLURM with SLURM_NTASKS > 1, Open MPI with
    OMPI_COMM_WORLD_SIZE > 1, several TPU_WORKER_HOSTNAMES, or JAXSD_DISTRIBUTED=1.
    """
    mode = env.get(DISTRIBUTED_ENV, "")
    if mode not in ("", "0", "1"):
        raise ValueError(f"${DISTRIBUTED_ENV}={mode!r}; use 1 (join), 0 (never) or leave it unset")
    if mode == "0":
        return None
    # A CPU job needs a cross-process collectives implementation (GPUs, TPUs bring theirs).
    cpu = "gloo" if env.get("JAX_PLATFORMS") == "cpu" else None
    explicit = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    if all(k in env for k in explicit):
        return dict(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
            cpu_collectives=cpu,
        )
    many = (
        mode == "1"
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    )
    return dict(cpu_collectives=cpu) if many else None


def maybe_initialize_distributed(env: Mapping[str, str] = os.environ) -> bool:
    """Join the multi-process job the environment describes (`distributed_args`); True if
    this process is part of one. Call before any other JAX call (scripts/train.py does)."""
    args = distributed_args(env)
    if args is None:
        return False
    initialize_distributed(**args)
    return True
