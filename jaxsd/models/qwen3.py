"""Flax NNX Qwen3 decoder; Qwen2, Llama and OLMo-3 are switches of `ModelConfig`.

Layer names mirror Hugging Face's (`self_attn.q_proj`, `input_layernorm`, ...), so the
safetensors mapping in `io.py` is a rename plus a kernel transpose. Kernels are [in, out].
Shape letters: B batch, T new tokens, S key slots (cache length), H hidden, N query heads,
K kv heads, G = N / K, D head_dim, V vocab, L layers, F intermediate.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsd.models.attention import apply_rope, attend_with, attention_mask
from jaxsd.models.config import ModelConfig
from jaxsd.models.lora import Linear, LoraConfig, _param
from jaxsd.models.sharding import RESIDUAL_AXES, MeshRules, constrain

Cache = dict[str, Any]  # {"k": tuple of L [B, S, K, D], "v": same, "index": int32 []}


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as in HF Qwen3RMSNorm: normalise in fp32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, axis_name: str, param_dtype: jnp.dtype):
        self.weight = _param(jnp.ones((dim,), param_dtype), (axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class Attention(nnx.Module):
    """GQA self-attention with optional q/k RMSNorm (per head or over the full projection)."""

    def __init__(
        self, cfg: ModelConfig, *, lora: LoraConfig | None, rngs: nnx.Rngs, layer: int = 0
    ):
        h, n, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(
            param_dtype=cfg.param_jnp_dtype,
            compute_dtype=cfg.compute_jnp_dtype,
            lora=lora,
            rngs=rngs,
        )
        self.q_proj = Linear(
            h, n * d, axes=("embed", "heads"), name="q", use_bias=cfg.qkv_bias, **kw
        )
        self.k_proj = Linear(
            h, k * d, axes=("embed", "kv_heads"), name="k", use_bias=cfg.qkv_bias, **kw
        )
        self.v_proj = Linear(
            h, k * d, axes=("embed", "kv_heads"), name="v", use_bias=cfg.qkv_bias, **kw
        )
        self.o_proj = Linear(n * d, h, axes=("heads", "embed"), name="o", use_bias=cfg.o_bias, **kw)
        if not cfg.qk_norm:
            self.q_norm = self.k_norm = None
        else:
            full = cfg.qk_norm_scope == "full"
            pd = cfg.param_jnp_dtype
            self.q_norm = RMSNorm(
                n * d if full else d,
                cfg.rms_norm_eps,
                axis_name="heads" if full else "head_dim",
                param_dtype=pd,
            )
            self.k_norm = RMSNorm(
                k * d if full else d,
                cfg.rms_norm_eps,
                axis_name="kv_heads" if full else "head_dim",
                param_dtype=pd,
            )
        self.full_qk_norm = cfg.qk_norm and cfg.qk_norm_scope == "full"
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, d
        rope = cfg.layer_rope(layer)
        self.rope_theta, self.rope_scaling = rope.theta, rope.scaling
        self.attention_impl = cfg.attention

    def __call__(
        self,
        x_BxTxH: jax.Array,
        positions_BxT: jax.Array,
        mask_BxTxS: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
        query_index: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Returns the output [B, T, H] and the (k, v) the step attended over ([B, S, K, D]).

        `query_index` [B, R] keeps only those query rows (keys and values still cover all T):
        the output is then [B, R, H].
        """
        x_q = x_BxTxH
        if query_index is not None:
            x_q = _rows(x_BxTxH, query_index)
            positions_q = _rows(positions_BxT, query_index)
            mask_BxTxS = _rows(mask_BxTxS, query_index)
        b, t, _ = x_q.shape
        q, k, v = self.q_proj(x_q), self.k_proj(x_BxTxH), self.v_proj(x_BxTxH)
        if self.full_qk_norm:  # OLMo: norm over all heads at once, before the head split
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(*x_BxTxH.shape[:2], self.num_kv_heads, self.head_dim)
        v = v.reshape(k.shape)
        if self.q_norm is not None and not self.full_qk_norm:  # Qwen3: per-head norm
            q, k = self.q_norm(q), self.k_norm(k)
        positions = positions_BxT if query_index is None else positions_q
        q = apply_rope(q, positions, self.rope_theta, self.rope_scaling)
        k = apply_rope(k, positions_BxT, self.rope_theta, self.rope_scaling)
        new_kv = (k, v)
        if kv is not None:
            start = (0, cache_index, 0, 0)
            new_kv = tuple(
                jax.lax.dynamic_update_slice(c, x.astype(c.dtype), start)
                for c, x in zip(kv, (k, v), strict=True)
            )
            # A cache narrower than the compute dtype (bf16 KV, fp32 compute) only narrows the
            # storage: it is read back widened, so q is never rounded to the cache's dtype.
            k, v = (c.astype(q.dtype) for c in new_kv)
        # The KV-cache (sampling) path always uses ours: decode steps are one query row.
        impl = "jaxsd" if kv is not None else self.attention_impl
        causal = kv is None and query_index is None
        out = attend_with(impl, q, k, v, mask_BxTxS, causal).astype(x_BxTxH.dtype)
        return self.o_proj(out.reshape(b, t, -1)), new_kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, lora: LoraConfig | None, rngs: nnx.Rngs):
        h, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(
            param_dtype=cfg.param_jnp_dtype,
            compute_dtype=cfg.compute_jnp_dtype,
            lora=lora,
            rngs=rngs,
            use_bias=False,
        )
        self.gate_proj = Linear(h, f, axes=("embed", "mlp"), name="gate", **kw)
        self.up_proj = Linear(h, f, axes=("embed", "mlp"), name="up", **kw)
        self.down_proj = Linear(f, h, axes=("mlp", "embed"), name="down", **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm (Qwen3/Llama: x + f(norm(x))) or post-norm (OLMo-3: x + norm(f(x)))."""

    def __init__(
        self, cfg: ModelConfig, *, lora: LoraConfig | None, rngs: nnx.Rngs, layer: int = 0
    ):
        self.self_attn = Attention(cfg, lora=lora, rngs=rngs, layer=layer)
        self.mlp = MLP(cfg, lora=lora, rngs=rngs)
        norm = lambda: RMSNorm(  # noqa: E731
            cfg.hidden_size, cfg.rms_norm_eps, axis_name="embed", param_dtype=cfg.param_jnp_dtype
        )
        self.post = cfg.norm_placement == "post"
        self.input_layernorm = None if self.post else norm()
        self.post_attention_layernorm = norm()
        self.post_feedforward_layernorm = norm() if self.post else None

    def __call__(self, x, positions_BxT, mask_BxTxS, kv=None, cache_index=None, query_index=None):
        """`query_index` [B, R]: compute only those output rows (the last layer of a forward
        whose caller reads R positions: its other rows feed nothing)."""
        attn_in = x if self.post else self.input_layernorm(x)
        a, kv = self.self_attn(attn_in, positions_BxT, mask_BxTxS, kv, cache_index, query_index)
        if query_index is not None:
            x = _rows(x, query_index)
        if self.post:
            x = x + self.post_attention_layernorm(a)
            return x + self.post_feedforward_layernorm(self.mlp(x)), kv
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


def _call_layer(layer: DecoderLayer, *args: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return layer(*args)


def _rows(x_BxTx: jax.Array, index_BxR: jax.Array) -> jax.Array:
    """x[b, index[b, r], ...]: [B, T, ...] -> [B, R, ...]."""
    index = index_BxR.reshape(index_BxR.shape + (1,) * (x_BxTx.ndim - 2))
    return jnp.take_along_axis(x_BxTx, index, axis=1)


def default_positions(attention_mask_BxT: jax.Array | None, b: int, t: int) -> jax.Array:
    """Positions = cumsum(mask) - 1 clipped at 0 (left padding starts real tokens at 0)."""
    if attention_mask_BxT is None:
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    pos = jnp.cumsum(attention_mask_BxT.astype(jnp.int32), axis=-1) - 1
    return jnp.maximum(pos, 0)


def _explicit_mesh(x: Any) -> Any:
    """The abstract mesh of `x`'s sharding type when it has Explicit axes, else None."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty:
        return None
    if not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return None
    return getattr(mesh, "abstract_mesh", mesh)


def _spec(x: Any) -> tuple[Any, ...]:
    """PartitionSpec entries of `x`'s sharding type (replicated when it has none)."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return tuple(spec) + (None,) * (x.ndim - len(spec)) if spec is not None else (None,) * x.ndim


class Transformer(nnx.Module):
    """Decoder-only LM: `__call__` gives logits, `hidden_states` the trunk, `logits` the head.

    `mesh_rules`: the mesh and logical rules the trainer shards this model with; the residual
    stream between layers is then constrained to the `RESIDUAL_AXES` layout (None: no
    constraint, e.g. the single-device rollout engine).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        lora: LoraConfig | None = None,
        mesh_rules: MeshRules | None = None,
    ):
        self.config = config
        self.lora_config = lora
        self.mesh_rules = mesh_rules
        emb = nnx.initializers.normal(0.02)(
            rngs.params(), (config.vocab_size, config.hidden_size), config.param_jnp_dtype
        )
        self.embed_tokens = _param(emb, ("vocab", "embed"))
        self.layers = nnx.List(
            [DecoderLayer(config, lora=lora, rngs=rngs, layer=i) for i in range(config.num_layers)]
        )
        self.norm = RMSNorm(
            config.hidden_size,
            config.rms_norm_eps,
            axis_name="embed",
            param_dtype=config.param_jnp_dtype,
        )
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(
                config.hidden_size,
                config.vocab_size,
                axes=("embed", "vocab"),
                name="lm_head",
                use_bias=False,
                param_dtype=config.param_jnp_dtype,
                compute_dtype=config.compute_jnp_dtype,
                lora=None,
                rngs=rngs,
            )

    def lm_head_weight(self) -> jax.Array:
        """[H, V] output projection (the embedding transposed when tied)."""
        if self.lm_head is None:
            return self.embed_tokens[...].T
        return self.lm_head.kernel[...]

    def _embed(self, input_ids_BxT: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], input_ids_BxT, axis=0).astype(
            self.config.compute_jnp_dtype
        )

    def _run_layers(
        self, x, positions_BxT, query_slots_T, key_valid_BxS, cache=None, output_index=None
    ):
        masks: dict[int | None, jax.Array] = {}
        new_k, new_v = [], []
        last = len(self.layers) - 1
        # A fully masked query row (left padding) gets uniform weights from ours but
        # implementation-defined values elsewhere: a padding slot also sees itself. Only
        # padding rows change; no real row reads them.
        see_self = cache is None and self.config.attention != "jaxsd"
        call = nnx.remat(_call_layer) if self.config.remat and cache is None else _call_layer
        x = constrain(x, RESIDUAL_AXES, self.mesh_rules)
        for i, layer in enumerate(self.layers):
            window = self.config.layer_window(i)
            if window not in masks:
                mask = attention_mask(query_slots_T, key_valid_BxS, window)
                if see_self:
                    mask |= query_slots_T[:, None] == jnp.arange(mask.shape[-1])[None, :]
                masks[window] = mask
            kv = None if cache is None else (cache["k"][i], cache["v"][i])
            index = None if cache is None else cache["index"]
            rows = output_index if i == last else None
            x, (k, v) = call(layer, x, positions_BxT, masks[window], kv, index, rows)
            x = constrain(x, RESIDUAL_AXES, self.mesh_rules)
            new_k.append(k)
            new_v.append(v)
        return self.norm(x), (tuple(new_k), tuple(new_v))

    def _in_auto_axes(self, method, out_specs, *args):
        """Run `method` with GSPMD (auto) sharding when the inputs live on an Explicit mesh.

        jax 0.10's make_mesh defaults to Explicit axes, under which ops such as the embedding
        gather of a vocab-sharded table have no unambiguous output sharding; the model's
        parameter shardings come from the logical rules, so inside it the compiler decides.
        """
        mesh = _explicit_mesh(args[0])
        if mesh is None:
            return method(self, *args)
        graphdef, state = nnx.split(self)
        body = lambda st, *a: method(nnx.merge(graphdef, st), *a)  # noqa: E731
        with jax.sharding.use_abstract_mesh(mesh):
            return jax.sharding.auto_axes(body, out_sharding=out_specs)(state, *args)

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        output_index: jax.Array | None = None,
    ) -> jax.Array:
        """Final-norm hidden states [B, T, H] (the train step applies the LM head in chunks).

        With `output_index` [B, R], only the hidden states at those positions, [B, R, H]: the
        last layer then runs its queries, MLP and norm on those R rows only (same values as
        indexing the full result, for a fraction of the last layer's work).
        """
        spec = P(*_spec(input_ids), None)
        return self._in_auto_axes(
            Transformer._hidden_states, spec, input_ids, attention_mask, positions, output_index
        )

    def _hidden_states(self, input_ids, attention_mask, positions, output_index=None):
        b, t = input_ids.shape
        chex.assert_rank(input_ids, 2)
        if attention_mask is not None:
            chex.assert_shape(attention_mask, (b, t))
        if positions is None:
            positions = default_positions(attention_mask, b, t)
        chex.assert_shape(positions, (b, t))
        valid_BxT = jnp.ones((b, t), bool) if attention_mask is None else attention_mask
        if output_index is not None:
            chex.assert_rank(output_index, 2)
            chex.assert_equal(output_index.shape[0], b)
        x = self._embed(input_ids)
        h, _ = self._run_layers(x, positions, jnp.arange(t), valid_BxT, output_index=output_index)
        return h

    def logits(self, h_BxTxH: jax.Array) -> jax.Array:
        """LM head: fp32 logits [B, T, V] from hidden states."""
        w = self.lm_head_weight().astype(self.config.compute_jnp_dtype)
        return jnp.einsum("bth,hv->btv", h_BxTxH, w, preferred_element_type=jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] (fp32) of a causal forward over `input_ids` [B, T]."""
        spec = P(*_spec(input_ids), None)
        return self._in_auto_axes(Transformer._forward, spec, input_ids, attention_mask, positions)

    def _forward(self, input_ids, attention_mask, positions):
        return self.logits(self._hidden_states(input_ids, attention_mask, positions))

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> Cache:
        """Empty KV cache with `max_length` slots (dtype defaults to the compute dtype)."""
        cfg = self.config
        dtype = cfg.compute_jnp_dtype if dtype is None else dtype
        shape = (batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return {
            "k": zeros,
            "v": tuple(jnp.zeros(shape, dtype) for _ in zeros),
            "index": jnp.zeros((), jnp.int32),
        }

    def decode(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        cache: Cache,
        cache_mask: jax.Array,
    ) -> tuple[jax.Array, Cache]:
        """Write T new tokens at slot cache["index"], attend causally over valid slots.

        `cache_mask` [B, S] marks the slots holding real tokens, including the T new ones.
        The caller keeps index + T <= S (slot writes past the end would be clamped).
        Returns fp32 logits [B, T, V] and the cache advanced by T.
        """
        specs = (P(*_spec(input_ids), None), jax.tree.map(lambda c: P(*_spec(c)), cache))
        return self._in_auto_axes(
            Transformer._decode, specs, input_ids, positions, cache, cache_mask
        )

    def _decode(self, input_ids, positions, cache, cache_mask):
        b, t = input_ids.shape
        s = cache["k"][0].shape[1]
        chex.assert_shape(positions, (b, t))
        chex.assert_shape(cache_mask, (b, s))
        query_slots_T = cache["index"] + jnp.arange(t)
        h, (k, v) = self._run_layers(
            self._embed(input_ids), positions, query_slots_T, cache_mask, cache
        )
        return self.logits(h), {"k": k, "v": v, "index": cache["index"] + t}
