"""Continuous batching for the embedded sampler: a fixed number of decode slots, refilled.

`generate(..., slots=S)` runs here. Every prompt is prefilled once (its KV cache and last
logits kept in a prompt pool, shared by its n samples); then S slots decode one token per
step, and a slot whose row stopped takes the next waiting row (prompt-major order) by
copying that row's prompt cache in. One `jax.jit` with static shapes per (batch bucket,
prompt bucket, max_new_tokens, n, S): the loop exits once every row is done.

The slot cache is a ring of L = P + M columns with one write column shared by all slots
(step mod L). A row that enters at write column c gets its prompt in the P columns just
behind c, (c - P + i) mod L, and its M new tokens at c, c + 1, ...: the ring never writes
over a live row's prompt. Attention is order-free given the validity mask (positions are
explicit, RoPE is applied before caching), so the decode masks only by validity.

Reproducibility: row r's token t is drawn with fold_in(fold_in(key(seed), r), t), the padded
sampler's keys, so a row's samples depend on (seed, r) and never on which slot ran it or
when. Both samplers therefore return the same tokens (up to logits rounding, which batch
composition can change in the last bit).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsd.models.sampler import prefill
from jaxsd.models.sampling import sample_step


def kv_bytes_per_row(cfg: Any, length: int, kv_dtype: str | None = None) -> int:
    """KV-cache bytes one row of `length` slots holds (K and V, every layer)."""
    itemsize = jnp.dtype(kv_dtype or cfg.compute_jnp_dtype).itemsize
    return 2 * cfg.num_layers * length * cfg.num_kv_heads * cfg.head_dim * itemsize


def _ring_place(rows_SxPx: jax.Array, length: int, shift: jax.Array) -> jax.Array:
    """[S, P, ...] -> [S, L, ...]: column i lands in ring column (i + shift) mod L, the rest 0."""
    pad = [(0, 0), (0, length - rows_SxPx.shape[1])] + [(0, 0)] * (rows_SxPx.ndim - 2)
    return jnp.roll(jnp.pad(rows_SxPx, pad), shift, axis=1)


def _check_full_attention(model: nnx.Module) -> None:
    cfg = model.config
    windowed = [i for i in range(cfg.num_layers) if cfg.layer_window(i) is not None]
    if windowed:
        raise ValueError(
            f"slots= (continuous batching) needs full attention, but layers {windowed[:4]} use "
            f"a sliding window of {cfg.sliding_window} (the ring cache would break it); "
            "use slots=None for this model"
        )


@functools.partial(
    jax.jit,
    static_argnums=(0,),
    static_argnames=("max_new_tokens", "n", "slots", "kv_dtype"),
)
def generate_slots(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_UxP: jax.Array,
    prompt_mask_UxP: jax.Array,
    row_keys_R: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    stop_ids_K: jax.Array,
    num_rows: jax.Array,
    *,
    max_new_tokens: int,
    n: int,
    slots: int,
    kv_dtype: str | None = None,
) -> dict[str, jax.Array]:
    """Same arguments and outputs as `sampler._generate_padded`, run on `slots` decode rows."""
    model = nnx.merge(graphdef, state)
    _check_full_attention(model)
    u, p = prompt_UxP.shape
    r = row_keys_R.shape[0]
    m, s, ring = max_new_tokens, slots, p + max_new_tokens
    positions_UxP = jnp.maximum(jnp.cumsum(prompt_mask_UxP, axis=-1) - 1, 0).astype(jnp.int32)
    pool_logits_UxV, pool = prefill(
        model, prompt_UxP, positions_UxP, model.init_cache(u, p, kv_dtype), prompt_mask_UxP
    )
    prompt_len_U = jnp.sum(prompt_mask_UxP, axis=-1).astype(jnp.int32)
    cache = model.init_cache(s, ring, kv_dtype)
    slot = {
        "row": jnp.full((s,), -1, jnp.int32),  # -1 = free
        "made": jnp.zeros((s,), jnp.int32),  # tokens the slot's row has generated
        "logits": jnp.zeros((s, pool_logits_UxV.shape[-1]), pool_logits_UxV.dtype),
        "k": cache["k"],
        "v": cache["v"],
        "mask": jnp.zeros((s, ring), jnp.int32),
    }
    out = {
        "tokens": jnp.zeros((r, m), jnp.int32),
        "logprobs": jnp.zeros((r, m), jnp.float32),
        "sampling_logprobs": jnp.zeros((r, m), jnp.float32),
        "lengths": jnp.zeros((r,), jnp.int32),
        "stopped": jnp.zeros((r,), bool),
    }
    pool = {"logits": pool_logits_UxV, "k": pool["k"], "v": pool["v"], "mask": prompt_mask_UxP}
    refill = functools.partial(_refill, pool=pool, num_rows=num_rows, n=n)

    def cond(carry):
        slot, next_row, _, _ = carry
        return jnp.any(slot["row"] >= 0) | (next_row < num_rows)

    def body(carry):
        slot, next_row, col, out = carry
        free_S = slot["row"] < 0
        slot, next_row, col = jax.lax.cond(
            jnp.any(free_S) & (next_row < num_rows), refill, lambda a: a, (slot, next_row, col)
        )
        live_S = slot["row"] >= 0
        row_S = jnp.maximum(slot["row"], 0)
        tok_S, logp_S, slogp_S = sample_step(
            row_keys_R[row_S], slot["made"], slot["logits"], temperature, top_k, top_p, min_p
        )
        # free slots write to row r: out of range, dropped
        dst_S, made_S = jnp.where(live_S, slot["row"], r), slot["made"]
        hit_stop_S = jnp.isin(tok_S, stop_ids_K)
        out = _record(out, dst_S, made_S, tok_S, logp_S, slogp_S, hit_stop_S)
        positions_S = prompt_len_U[jnp.minimum(row_S // n, u - 1)] + made_S
        slot = _decode(model, slot, tok_S, positions_S, live_S, col)
        done_S = live_S & (hit_stop_S | (made_S + 1 >= m))
        slot = slot | {"row": jnp.where(done_S, -1, slot["row"]), "made": made_S + 1}
        return slot, next_row, (col + 1) % ring, out

    carry = (slot, jnp.int32(0), jnp.int32(p), out)
    return jax.lax.while_loop(cond, body, carry)[-1]


def _refill(
    args: tuple[dict, jax.Array, jax.Array], *, pool: dict, num_rows: jax.Array, n: int
) -> tuple[dict, jax.Array, jax.Array]:
    """Free slots take the next rows, in slot order; their caches get the prompt from `pool`
    (each prompt's prefilled K/V, last logits and mask, [U, ...])."""
    slot, next_row, col = args
    s, ring = slot["mask"].shape
    u, p = pool["mask"].shape
    free_S = slot["row"] < 0
    row_S = next_row + jnp.cumsum(free_S) - 1
    take_S = free_S & (row_S < num_rows)
    u_S = jnp.minimum(row_S // n, u - 1)
    shift = col - p  # the prompt ends just behind the write column

    def place(old, pooled):
        new = _ring_place(pooled[u_S], ring, shift)
        return jnp.where(take_S.reshape((s,) + (1,) * (old.ndim - 1)), new, old)

    slot = {
        "row": jnp.where(take_S, row_S, slot["row"]),
        "made": jnp.where(take_S, 0, slot["made"]),
        "logits": jnp.where(take_S[:, None], pool["logits"][u_S], slot["logits"]),
        "k": tuple(place(c, pc) for c, pc in zip(slot["k"], pool["k"], strict=True)),
        "v": tuple(place(c, pc) for c, pc in zip(slot["v"], pool["v"], strict=True)),
        "mask": place(slot["mask"], pool["mask"]),
    }
    return slot, next_row + jnp.sum(take_S), col


def _record(
    out: dict[str, jax.Array],
    dst_S: jax.Array,
    made_S: jax.Array,
    tok_S: jax.Array,
    logp_S: jax.Array,
    slogp_S: jax.Array,
    hit_stop_S: jax.Array,
) -> dict[str, jax.Array]:
    """Each slot's new token written to its row's `made`-th column (rows >= R are dropped)."""
    return {
        "tokens": out["tokens"].at[dst_S, made_S].set(tok_S, mode="drop"),
        "logprobs": out["logprobs"].at[dst_S, made_S].set(logp_S, mode="drop"),
        "sampling_logprobs": out["sampling_logprobs"].at[dst_S, made_S].set(slogp_S, mode="drop"),
        "lengths": out["lengths"].at[dst_S].add(1, mode="drop"),
        "stopped": out["stopped"].at[dst_S].set(hit_stop_S, mode="drop"),
    }


def _decode(
    model: nnx.Module,
    slot: dict,
    tok_S: jax.Array,
    positions_S: jax.Array,
    live_S: jax.Array,
    col: jax.Array,
) -> dict:
    """Feed each slot's token at ring column `col`: the slots' next logits and K/V caches."""
    ring = slot["mask"].shape[1]
    mask = slot["mask"].at[:, col].set(live_S.astype(jnp.int32))
    # Query slot L-1 sees every column: the ring is masked by validity alone.
    h, (k, v) = model._run_layers(
        model._embed(tok_S[:, None]),
        positions_S[:, None],
        jnp.full((1,), ring - 1),
        mask,
        {"k": slot["k"], "v": slot["v"], "index": col},
    )
    logits = model.logits(h)[:, 0].astype(slot["logits"].dtype)
    return slot | {"logits": logits, "k": k, "v": v, "mask": mask}
