"""LoRA adapters (Hu et al. 2021): y = x W + (alpha / r) (x A) B, with B initialised to zero.

Adapters are `nnx.LoRAParam` variables beside the base `nnx.Param` kernels, so the trainable set
is a state filter (`LORA_FILTER`) and the base weights stay untouched. SSOPD's fixed teacher is
the base model: `lora_disabled(state)` zeroes every adapter (a pure function of the state, same
graph, no recompile) and `set_lora_enabled(model, False)` skips them (a static switch).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# Trainable set with LoRA: only the adapters.
LORA_FILTER = nnx.LoRAParam


def trainable_filter(lora: LoraConfig | None) -> type:
    """What the optimizer trains: every Param without LoRA, only the adapters with it."""
    return nnx.Param if lora is None else LORA_FILTER


@jax.custom_vjp
def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x [..., I] @ w [I, O]`, with a backward pass that transposes the narrower operand.

    The weight gradient contracts the token axes of `x` and of the output cotangent `g`, so a
    GEMM needs one of them transposed. JAX's transpose rule always puts `g` first
    (`dwᵀ = gᵀ x`); XLA:CPU then fuses `gᵀ` into g's elementwise producer (SwiGLU's backward),
    a strided loop far slower than the plain one. Here the operand with fewer features is the
    transposed one (`x` on ties: q/k/v and gate/up share it), which makes the CPU train step
    faster. GPUs and TPUs take either operand order at no cost.
    """
    return x @ w


def _dense_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return x @ w, (x, w)


def _dense_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    dx = g @ w.T
    if w.shape[1] < w.shape[0]:
        dw = jnp.einsum("...o,...i->oi", g, x).T
    else:
        dw = jnp.einsum("...i,...o->io", x, g)
    return dx.astype(x.dtype), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapter rank, alpha (scale = alpha / rank) and which projections carry adapters."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = LORA_TARGETS
    dtype: str = "float32"  # adapters stay fp32 even for bf16 base weights

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"LoRA rank={self.rank} must be positive")
        unknown = set(self.targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {LORA_TARGETS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _param(value: jax.Array, axes: tuple[str | None, ...], cls: type = nnx.Param) -> nnx.Variable:
    """A variable carrying its logical axis names (read by `sharding.param_shardings`)."""
    # eager_sharding=False: names are metadata only; placement happens in param_shardings.
    return cls(value, out_sharding=axes, eager_sharding=False)


class Linear(nnx.Module):
    """Bias-optional dense layer `x @ kernel [in, out]` with an optional LoRA adapter."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str, str],
        name: str,
        use_bias: bool,
        param_dtype: jnp.dtype,
        compute_dtype: jnp.dtype,
        lora: LoraConfig | None,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(0.02)  # HF initializer_range
        self.kernel = _param(init(rngs.params(), (in_features, out_features), param_dtype), axes)
        self.bias = (
            _param(jnp.zeros((out_features,), param_dtype), (axes[1],)) if use_bias else None
        )
        self.compute_dtype = compute_dtype
        self.lora_enabled = True
        if lora is not None and name in lora.targets:
            dt = jnp.dtype(lora.dtype)
            # PEFT's default: kaiming-uniform A (bound 1/sqrt(in)), zero B -> no change at init.
            bound = 1.0 / in_features**0.5
            a = jax.random.uniform(rngs.params(), (in_features, lora.rank), dt, -bound, bound)
            self.lora_a = _param(a, (axes[0], None), nnx.LoRAParam)
            self.lora_b = _param(
                jnp.zeros((lora.rank, out_features), dt), (None, axes[1]), nnx.LoRAParam
            )
            self.lora_scale = lora.scale
        else:
            self.lora_a = self.lora_b = None
            self.lora_scale = 0.0

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.compute_dtype)
        y = dense(x, self.kernel[...].astype(self.compute_dtype))
        if self.lora_a is not None and self.lora_enabled:
            a = self.lora_a[...].astype(self.compute_dtype)
            b = self.lora_b[...].astype(self.compute_dtype)
            y = y + ((x @ a) @ b) * self.lora_scale
        if self.bias is not None:
            y = y + self.bias[...].astype(self.compute_dtype)
        return y

    def merged_kernel(self) -> jax.Array:
        """W + (alpha / r) A B in the kernel's dtype (the base kernel when there is no adapter)."""
        w = self.kernel[...]
        if self.lora_a is None:
            return w
        delta = self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32)
        return (w.astype(jnp.float32) + self.lora_scale * delta).astype(w.dtype)


def _lora_linears(model: nnx.Module) -> list[Linear]:
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, Linear) and m.lora_a is not None]


def set_lora_enabled(model: nnx.Module, enabled: bool) -> None:
    """Switch every adapter on or off in place (static: a jitted function retraces)."""
    for m in _lora_linears(model):
        m.lora_enabled = enabled


def lora_disabled(params_state: nnx.State) -> nnx.State:
    """The same state with every LoRAParam zeroed: the forward equals the base model's."""
    lora, rest = nnx.split_state(params_state, nnx.LoRAParam, ...)
    return nnx.merge_state(rest, jax.tree.map(jnp.zeros_like, lora))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A new model of the same class without adapters whose kernels are W + (alpha/r) A B."""
    cls = type(model)
    merged = nnx.eval_shape(lambda: cls(model.config, rngs=nnx.Rngs(0), lora=None))
    src = dict(nnx.iter_graph(model))
    for path, var in nnx.iter_graph(merged):
        if not isinstance(var, nnx.Variable):
            continue
        parent = src[path[:-1]]
        if isinstance(parent, Linear) and path[-1] == "kernel":
            var.set_value(parent.merged_kernel())
        else:
            var.set_value(src[path][...])
    return merged
