"""Logical axis names -> mesh axes (a MaxText-style rules table).

Every parameter carries its logical axes as nnx metadata (`out_sharding`, set by
`lora._param`), e.g. a q_proj kernel is ("embed", "heads"). One rules table maps logical
names to mesh axes; a single device, 8 GPUs and a TPU pod differ only in the mesh.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalAxes = Sequence[str | None]
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    # parameters: FSDP shards the model dimension, tensor parallelism the wide ones
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def logical_axes_of(var: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names stored on a variable (None when it has none)."""
    axes = var.get_metadata().get("out_sharding")
    return None if axes is None else tuple(axes)


def logical_to_mesh_spec(
    logical_axes: LogicalAxes,
    rules: Rules = DEFAULT_RULES,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """PartitionSpec for `logical_axes` under `rules`.

    With `mesh`, mesh axes it lacks are dropped; with `shape` too, a dimension that its mesh
    axes do not divide is replicated (a 151,936-row vocab on 3 devices, a tiny test model).
    A mesh axis is used at most once per spec (first dimension wins).
    """
    table = dict(rules)
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for i, name in enumerate(logical_axes):
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; rules cover {sorted(table)}")
        target = None if name is None else table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and (mesh is None or a in mesh.shape))
        if mesh is not None and shape is not None and axes:
            size = 1
            for a in axes:
                size *= mesh.shape[a]
            if shape[i] % size:
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def param_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """Same-structure tree of NamedSharding for `state` (use as jit in/out_shardings).

    Variables without logical axes are replicated.
    """

    def one(x: Any) -> Any:
        if isinstance(x, nnx.Variable):
            axes = logical_axes_of(x)
            spec = (
                PartitionSpec()
                if axes is None
                else logical_to_mesh_spec(axes, rules, mesh, x.shape)
            )
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """`state` placed on `mesh` by `param_shardings` (small models / tests; large models
    should create the state already sharded via jit out_shardings, never whole on one device)."""
    return jax.device_put(state, param_shardings(state, mesh, rules))
