"""TrainState: params, teacher, optimizer state, step, RNG — created already sharded.

The model is split once into a static `GraphDef` and arrays: `params` (what the optimizer
trains: every `nnx.Param`, or only the `nnx.LoRAParam` adapters), `frozen` (everything else:
LoRA base weights, non-parameter variables) and `teacher` (the teacher's version of `params`:
an EMA copy, the frozen initial values, or None when the teacher is the current student).
`nnx.merge(graphdef, params, frozen)` rebuilds the student, `(teacher, frozen)` the teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsd.models.lora import lora_disabled

__all__ = [
    "TEACHER_MODES",
    "TrainState",
    "create_train_state",
    "ema_update",
    "state_shardings",
    "train_state_from_model",
]

TEACHER_MODES = ("ema", "fixed", "none")


@flax.struct.dataclass
class TrainState:
    """Everything the jitted step reads and writes (a pytree of arrays)."""

    step: jax.Array  # [] int32, optimizer steps taken
    params: nnx.State  # trainable variables
    frozen: nnx.State  # the rest of the model
    teacher: nnx.State | None  # teacher's trainable part; None -> the current student
    opt_state: optax.OptState
    rng: jax.Array  # [2] uint32 (raw key data: checkpoints store it as a plain array)


def _check_mode(teacher_mode: str) -> None:
    if teacher_mode not in TEACHER_MODES:
        raise ValueError(f"teacher_mode={teacher_mode!r} unknown; use one of {TEACHER_MODES}")


def _initial_teacher(params: nnx.State, teacher_mode: str) -> nnx.State | None:
    """EMA starts at the student; fixed = initial weights with any LoRA adapters disabled."""
    if teacher_mode == "none":
        return None
    # A copy, not an alias: the state is donated to the step and params/teacher diverge.
    teacher = jax.tree.map(jnp.copy, params)
    return lora_disabled(teacher) if teacher_mode == "fixed" else teacher


def ema_update(teacher: nnx.State, params: nnx.State, rate: float) -> nnx.State:
    """Teacher EMA `theta_T <- (1 - rate) theta_T + rate theta`, METHODS §1."""
    return jax.tree.map(lambda t, p: ((1.0 - rate) * t + rate * p).astype(t.dtype), teacher, params)


def _state_from_model(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    trainable: Any,
    teacher_mode: str,
    seed: int,
) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=frozen,
        teacher=_initial_teacher(params, teacher_mode),
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
    return graphdef, state


def state_shardings(
    abstract_state: TrainState,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Any = None,
) -> TrainState:
    """Same-structure tree of `NamedSharding`: params by logical rules, scalars replicated.

    Optimizer moments mirror their parameter's sharding (found with `optax.tree_map_params`).
    """
    from jaxsd.models import sharding as model_sharding

    def params_sharding(tree: nnx.State) -> nnx.State:
        if rules is None:
            return model_sharding.param_shardings(tree, mesh)
        return model_sharding.param_shardings(tree, mesh, rules)

    repl = NamedSharding(mesh, PartitionSpec())
    p_shard = params_sharding(abstract_state.params)
    opt_shard = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_state.opt_state,
        p_shard,
        transform_non_params=lambda _: repl,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return TrainState(
        step=repl,
        params=p_shard,
        frozen=params_sharding(abstract_state.frozen),
        teacher=None if abstract_state.teacher is None else p_shard,
        opt_state=opt_shard,
        rng=repl,
    )


def create_train_state(
    model_fn: Callable[[nnx.Rngs], nnx.Module],
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    seed: int = 0,
    teacher_mode: str = "ema",
    trainable: Any = nnx.Param,
    rules: Any = None,
) -> tuple[nnx.GraphDef, TrainState, TrainState | None]:
    """Initialise a random model's TrainState directly into its shards (STYLE §14).

    `model_fn(rngs)` builds the model, e.g. `lambda r: Transformer(cfg, rngs=r, lora=lora)`;
    `trainable` is the optimizer's state filter (`nnx.LoRAParam` for LoRA). The init is
    `jax.eval_shape`d; with a mesh, shardings come from the model's logical rules and the real
    init runs under `jax.jit(out_shardings=...)`, so no device or host ever holds the whole
    state; without one it runs op by op on the default device.
    Returns `(graphdef, state, shardings)`; shardings is None without a mesh.
    """
    _check_mode(teacher_mode)

    key = jax.random.key(seed)
    if mesh is None:
        # Op by op, not jitted: a jitted init compiles every layer's initialisers anew (0.6B
        # shape, 28 layers: 25 s of compile on CPU, ~80 s on an H100), while eager dispatch
        # compiles one kernel per parameter shape and reuses it across layers (CPU, whole
        # init: 52 -> 34 s and 14.9 -> 12.2 GB peak RSS).
        model = model_fn(nnx.Rngs(key))
        return train_state_from_model(
            model, tx, seed=seed, teacher_mode=teacher_mode, trainable=trainable
        )

    # The key is an argument, not a constant: with a constant seed XLA constant-folds the whole
    # random init (minutes of "slow compile" for a 0.6B model on GPU).
    def init(key: jax.Array) -> TrainState:
        return _state_from_model(model_fn(nnx.Rngs(key)), tx, trainable, teacher_mode, seed)[1]

    graphdef = nnx.split(nnx.eval_shape(lambda: model_fn(nnx.Rngs(seed))), trainable, ...)[0]
    shardings = state_shardings(jax.eval_shape(init, key), tx, mesh, rules)
    return graphdef, jax.jit(init, out_shardings=shardings)(key), shardings


def train_state_from_model(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    seed: int = 0,
    teacher_mode: str = "ema",
    trainable: Any = nnx.Param,
    rules: Any = None,
) -> tuple[nnx.GraphDef, TrainState, TrainState | None]:
    """TrainState of an existing (e.g. pretrained) model, placed onto `mesh` when given."""
    _check_mode(teacher_mode)
    graphdef, state = _state_from_model(model, tx, trainable, teacher_mode, seed)
    if mesh is None:
        return graphdef, state, None
    shardings = state_shardings(jax.eval_shape(lambda: state), tx, mesh, rules)
    return graphdef, jax.device_put(state, shardings), shardings
