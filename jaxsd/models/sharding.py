"""Logical axis names -> mesh axes (a MaxText-style rules table).

Every parameter carries its logical axes as nnx metadata (`out_sharding`, set by
`lora._param`), e.g. a q_proj kernel is ("embed", "heads"); activations and the train batch
name theirs where they are constrained or fed (("batch", "length", "embed")). One rules table
(the config's `mesh.rules`, `DEFAULT_RULES` by default) maps logical names to mesh axes; a
single device, 8 GPUs and a TPU pod differ only in the mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
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
LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)
# The residual stream [B, T, H] between decoder layers.
RESIDUAL_AXES = ("batch", "length", "embed")


def _as_tuple(target: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return (target,) if isinstance(target, str) else tuple(target or ())


def rules_to_strings(rules: Rules = DEFAULT_RULES) -> dict[str, str]:
    """Rules as the config writes them: {"batch": "data,fsdp", "length": "", ...}."""
    return {name: ",".join(_as_tuple(target)) for name, target in rules}


def rule_axes(rules: Rules, name: str) -> tuple[str, ...]:
    """The mesh axes logical axis `name` maps to under `rules` (() = replicated)."""
    return _as_tuple(dict(rules)[name])


def rules_from_strings(table: Mapping[str, str]) -> tuple[tuple[str, Any], ...]:
    """The config's `mesh.rules` mapping -> a rules table ("" = replicated, "a,b" = both)."""
    rules = []
    for name, value in table.items():
        axes = tuple(a.strip() for a in str(value).split(",") if a.strip())
        rules.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    return tuple(rules)


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
        axes = () if name is None else _as_tuple(table[name])
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


@dataclasses.dataclass(frozen=True)
class MeshRules:
    """A mesh and its rules table: what a sharded model needs to place its activations."""

    mesh: Mesh
    rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

    def sharding(self, logical_axes: LogicalAxes, shape: Sequence[int]) -> NamedSharding:
        """NamedSharding of an array of `shape` whose dimensions carry `logical_axes`."""
        return NamedSharding(
            self.mesh, logical_to_mesh_spec(logical_axes, self.rules, self.mesh, shape)
        )


def constrain(x: jax.Array, logical_axes: LogicalAxes, mesh_rules: MeshRules | None) -> jax.Array:
    """`x` pinned to the rules' layout for `logical_axes` (a no-op without a mesh or on one
    device), so that XLA's sharding propagation cannot pick another one."""
    if mesh_rules is None or mesh_rules.mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, mesh_rules.sharding(logical_axes, x.shape))


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Where a variable lives on `mesh`: by its logical axes, replicated without any."""
    axes = logical_axes_of(var)
    spec = PartitionSpec() if axes is None else logical_to_mesh_spec(axes, rules, mesh, var.shape)
    return NamedSharding(mesh, spec)


def param_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """Same-structure tree of NamedSharding for `state` (use as jit in/out_shardings).

    Variables without logical axes are replicated.
    """

    def one(x: Any) -> Any:
        if isinstance(x, nnx.Variable):
            return x.replace(variable_sharding(x, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """`state` placed on `mesh` by `param_shardings` (small models / tests; large models
    should create the state already sharded via jit out_shardings, never whole on one device)."""
    return jax.device_put(state, param_shardings(state, mesh, rules))
