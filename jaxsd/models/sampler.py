"""Embedded JAX sampler: jitted prefill + KV-cache decode for a batch of prompts x n samples.

One `jax.jit` runs the prefill and the whole decode loop (`lax.while_loop`, which exits
early once every row has stopped). Prompts are left-padded to a length bucket and the
batch to a batch-size bucket, and every sampling knob (temperature, top-k, top-p, min-p,
stop ids, seed) is an array argument, so a run compiles once per (batch bucket, length bucket,
max_new_tokens, n) and never per call. Each prompt is prefilled once; its n sample rows start
from copies of its KV cache.

Logprobs. `SampleOutput.logprobs[i][t]` is log_softmax(raw model logits)[token] at
temperature 1 with no top-k/top-p: the behaviour log-prob that the train step's `old_logp`
needs for logπ_old in the ratios of METHODS §2 (importance weight) and §4 (GRPO); with
temperature 1 and no filter (the training default) it is also the sampling distribution.
`SampleOutput.sampling_logprobs` holds the log-prob under the distribution actually sampled
from (temperature, top-k, top-p applied; 0 for greedy).

Randomness is per row: row r of a call uses fold_in(key(seed), r) then fold_in(., step),
so a row's random draws do not depend on its batch mates, the batch bucket, or (with
`slots`, continuous batching in `jaxsd.models.continuous`) the slot and time it ran in.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The sampling math lives in `sampling`; its public functions stay importable from here.
from jaxsd.models.sampling import (
    filter_logits,
    gumbel_max_sample,
    min_p_filter,
    sample_step,
    sample_token,
    sampling_logits,
)

__all__ = [
    "DEFAULT_LENGTH_BUCKETS",
    "SampleOutput",
    "bucket_size",
    "compile_count",
    "filter_logits",
    "generate",
    "gumbel_max_sample",
    "min_p_filter",
    "prefill",
    "sample_step",
    "sample_token",
    "sampling_logits",
]

DEFAULT_LENGTH_BUCKETS = tuple(2**i for i in range(4, 16))  # 16 ... 32768
_STOP_SLOTS = 8  # stop ids are padded to a multiple of this, so their count rarely recompiles


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """Per-sample results, prompt-major: samples of prompt 0 first (`prompt_index` says which).

    token_ids: generated tokens (a stop token, when hit, is included as the last token).
    logprobs: float32 [len(token_ids[i])], log_softmax(raw logits)[token] at temperature 1.
    sampling_logprobs: same shape, under the tempered, top-k/top-p-filtered distribution.
    finish_reasons: "stop" (a stop token was generated) or "length" (max_new_tokens reached).
    """

    token_ids: list[list[int]]
    logprobs: list[np.ndarray]
    sampling_logprobs: list[np.ndarray]
    finish_reasons: list[str]
    prompt_index: list[int]


def bucket_size(size: int, buckets: Sequence[int] | None, what: str) -> int:
    """Smallest bucket >= size (next power of two when `buckets` is None)."""
    if buckets is None:
        return 1 << max(0, size - 1).bit_length()
    fitting = [b for b in sorted(buckets) if b >= size]
    if not fitting:
        raise ValueError(
            f"{what}={size} exceeds the largest bucket {max(buckets)}; add a larger bucket"
        )
    return fitting[0]


def prefill(
    model: nnx.Module,
    prompt_BxP: jax.Array,
    positions_BxP: jax.Array,
    cache: dict,
    cache_mask_BxS: jax.Array,
) -> tuple[jax.Array, dict]:
    """`model.decode` over the prompt, with the LM head applied to the last column only.

    Returns logits [B, V] of the last prompt column and the advanced cache.
    """
    # model.decode returns logits for all P columns: at P=2048 and a 152k vocab that is
    # 1.2 GB per row, and XLA does not push the last-column slice through the LM head. So
    # this repeats decode's steps on the model's (private) layer stack; a test pins it to
    # model.decode. Drop it once the model exposes the hidden states of a decode.
    t = prompt_BxP.shape[1]
    slots_T = cache["index"] + jnp.arange(t)
    h_BxPxH, (k, v) = model._run_layers(
        model._embed(prompt_BxP), positions_BxP, slots_T, cache_mask_BxS, cache
    )
    return model.logits(h_BxPxH[:, -1:])[:, 0], {"k": k, "v": v, "index": cache["index"] + t}


def _rows_of_slots(x_UxD: jax.Array, n: int, b: int) -> jax.Array:
    """Row r of the result is slot r // n of `x` (the n samples of a prompt share its slot)."""
    return x_UxD if n == 1 else jnp.repeat(x_UxD, n, axis=0)[:b]


@functools.partial(
    jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens", "n", "kv_dtype")
)
def _generate_padded(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_UxP: jax.Array,
    prompt_mask_UxP: jax.Array,
    row_keys_B: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    stop_ids_K: jax.Array,
    num_rows: jax.Array,
    *,
    max_new_tokens: int,
    n: int,
    kv_dtype: str | None = None,
) -> dict[str, jax.Array]:
    """Prefill the U left-padded prompts once, copy each one's cache to its n sample rows,
    then decode up to max_new_tokens tokens per row (B rows, B <= U * n)."""
    model = nnx.merge(graphdef, state)
    u, p = prompt_UxP.shape
    b = row_keys_B.shape[0]
    m = max_new_tokens
    mask_UxS = jnp.concatenate([prompt_mask_UxP, jnp.zeros((u, m), prompt_mask_UxP.dtype)], 1)
    positions_UxP = jnp.maximum(jnp.cumsum(prompt_mask_UxP, axis=-1) - 1, 0).astype(jnp.int32)
    # Left padding puts every prompt's last token in the last column.
    last_logits_UxV, cache = prefill(
        model, prompt_UxP, positions_UxP, model.init_cache(u, p + m, kv_dtype), mask_UxS
    )
    last_logits_BxV = _rows_of_slots(last_logits_UxV, n, b)
    cache = {
        "k": tuple(_rows_of_slots(k, n, b) for k in cache["k"]),
        "v": tuple(_rows_of_slots(v, n, b) for v in cache["v"]),
        "index": cache["index"],
    }
    mask_BxS = _rows_of_slots(mask_UxS, n, b)
    prompt_len_B = jnp.sum(_rows_of_slots(prompt_mask_UxP, n, b), axis=-1).astype(jnp.int32)
    sample = functools.partial(
        sample_step, row_keys_B, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p
    )

    def cond(carry):
        step, _, _, _, out = carry
        return (step < m) & ~jnp.all(out["stopped"])

    def body(carry):
        # Sample from the carried logits, then feed the token: one sampler and one decode in
        # the graph (prefill feeds step 0); the last step's decode is never read.
        step, logits_BxV, cache, mask_BxS, out = carry
        tok_B, logp_B, slogp_B = sample(step, logits_BxV)
        live_B = ~out["stopped"]
        out = {
            "tokens": out["tokens"].at[:, step].set(tok_B),
            "logprobs": out["logprobs"].at[:, step].set(logp_B),
            "sampling_logprobs": out["sampling_logprobs"].at[:, step].set(slogp_B),
            "lengths": out["lengths"] + live_B.astype(jnp.int32),
            "stopped": out["stopped"] | (live_B & jnp.isin(tok_B, stop_ids_K)),
        }
        mask_BxS = mask_BxS.at[:, p + step].set(1)
        positions_Bx1 = (prompt_len_B + step)[:, None]
        logits_Bx1xV, cache = model.decode(tok_B[:, None], positions_Bx1, cache, mask_BxS)
        return step + 1, logits_Bx1xV[:, 0], cache, mask_BxS, out

    out = {
        "tokens": jnp.zeros((b, m), jnp.int32),
        "logprobs": jnp.zeros((b, m), jnp.float32),
        "sampling_logprobs": jnp.zeros((b, m), jnp.float32),
        "lengths": jnp.zeros((b,), jnp.int32),
        # Batch-bucket padding rows start stopped so they never keep the loop running.
        "stopped": jnp.arange(b) >= num_rows,
    }
    carry = (jnp.int32(0), last_logits_BxV, cache, mask_BxS, out)
    return jax.lax.while_loop(cond, body, carry)[-1]


def _validate(
    prompt_ids: Sequence[Sequence[int]],
    vocab_size: int,
    max_positions: int,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    min_p: float = 0.0,
) -> None:
    if not prompt_ids:
        raise ValueError("prompt_ids is empty; pass at least one prompt (a list of token ids)")
    for i, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids {bad[:5]} outside [0, {vocab_size})")
    if n < 1:
        raise ValueError(f"n={n} must be >= 1 (samples per prompt)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    longest = max(map(len, prompt_ids))
    if longest + max_new_tokens > max_positions:
        raise ValueError(
            f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings={max_positions}; shorten the prompt or max_new_tokens"
        )
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if not 0 <= top_k <= vocab_size:
        raise ValueError(f"top_k={top_k} must be in [0, vocab size {vocab_size}] (0 = off)")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p={min_p} must be in [0, 1] (0 = off)")


def generate(
    model: nnx.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    n: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    stop_token_ids: Sequence[int] = (),
    seed: int = 0,
    length_buckets: Sequence[int] | None = DEFAULT_LENGTH_BUCKETS,
    batch_buckets: Sequence[int] | None = None,
    slots: int | None = None,
    kv_dtype: str | None = None,
) -> SampleOutput:
    """Sample n continuations of each prompt with the KV cache (temperature 0 = greedy).

    `length_buckets` pads prompts (on the left) to the smallest bucket that fits the longest;
    `batch_buckets` pads len(prompt_ids) * n rows (None = next power of two).
    `slots`: None decodes every row at once, each until the longest is done; an int decodes
    that many rows at a time and refills a finished row's slot with a waiting one
    (`jaxsd.models.continuous`). Same tokens either way: row r's draws are keyed by (seed, r).
    `kv_dtype`: KV-cache storage ("bfloat16" halves its memory; attention still computes in
    the model's compute dtype with fp32 scores); None = the compute dtype.
    """
    cfg = model.config
    _validate(
        prompt_ids, cfg.vocab_size, cfg.max_position_embeddings, n, max_new_tokens,
        temperature, top_p, top_k, min_p,
    )  # fmt: skip
    if slots is not None and slots < 1:
        raise ValueError(f"slots={slots} must be >= 1 (rows decoded at once) or None")
    kv_dtype = None if kv_dtype is None else _dtype_name(kv_dtype)
    num_rows = len(prompt_ids) * n
    b = bucket_size(num_rows, batch_buckets, "batch size (prompts x n)")
    # Each prompt is prefilled once (slot u feeds rows u*n .. u*n+n-1): n x less prefill.
    u = -(-b // n)
    p = bucket_size(max(map(len, prompt_ids)), length_buckets, "prompt length")
    prompt_UxP, mask_UxP = _left_padded(prompt_ids, u, p)
    stop_ids_K = _padded_stop_ids(stop_token_ids)
    row_keys_B = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        jax.random.key(seed), jnp.arange(b)
    )
    graphdef, state = nnx.split(model)
    if slots is None:
        run = functools.partial(_generate_padded, kv_dtype=kv_dtype)
    else:
        # imported here: the slot sampler builds on this module's prefill
        from jaxsd.models.continuous import generate_slots

        run = functools.partial(generate_slots, slots=min(slots, b), kv_dtype=kv_dtype)
    out = run(
        graphdef,
        state,
        jnp.asarray(prompt_UxP),
        jnp.asarray(mask_UxP),
        row_keys_B,
        jnp.float32(temperature),
        jnp.int32(top_k),
        jnp.float32(top_p),
        jnp.float32(min_p),
        jnp.asarray(stop_ids_K),
        jnp.int32(num_rows),
        max_new_tokens=max_new_tokens,
        n=n,
    )
    out = jax.device_get(out)
    chex.assert_shape(out["tokens"], (b, max_new_tokens))
    return _sample_output(out, len(prompt_ids), n)


def _left_padded(
    prompt_ids: Sequence[Sequence[int]], u: int, p: int
) -> tuple[np.ndarray, np.ndarray]:
    """(prompts [U, P], their 0/1 mask): slot i holds prompt i mod len(prompt_ids), left-padded."""
    prompt_UxP = np.zeros((u, p), np.int32)
    mask_UxP = np.zeros((u, p), np.int32)
    for slot in range(u):
        # padding slots repeat real prompts; their rows' output is dropped
        prompt = list(map(int, prompt_ids[slot % len(prompt_ids)]))
        prompt_UxP[slot, p - len(prompt) :] = prompt
        mask_UxP[slot, p - len(prompt) :] = 1
    return prompt_UxP, mask_UxP


def _padded_stop_ids(stop_token_ids: Sequence[int]) -> np.ndarray:
    """The distinct stop ids, sorted, padded with -1 to a multiple of `_STOP_SLOTS`."""
    stops = sorted(set(map(int, stop_token_ids)))
    stop_slots = _STOP_SLOTS * max(1, -(-len(stops) // _STOP_SLOTS))
    stop_ids_K = np.full((stop_slots,), -1, np.int32)  # -1 never matches a sampled token
    stop_ids_K[: len(stops)] = stops
    return stop_ids_K


def _sample_output(out: dict[str, np.ndarray], num_prompts: int, n: int) -> SampleOutput:
    """The decode loop's padded host arrays cut to each real row's generated tokens."""
    num_rows = num_prompts * n
    lengths = out["lengths"][:num_rows]
    _check_finite(out["logprobs"][:num_rows], lengths)
    return SampleOutput(
        token_ids=[out["tokens"][r, :k].tolist() for r, k in enumerate(lengths)],
        logprobs=[out["logprobs"][r, :k] for r, k in enumerate(lengths)],
        sampling_logprobs=[out["sampling_logprobs"][r, :k] for r, k in enumerate(lengths)],
        finish_reasons=["stop" if s else "length" for s in out["stopped"][:num_rows]],
        prompt_index=[i for i in range(num_prompts) for _ in range(n)],
    )


def _dtype_name(kv_dtype: str) -> str:
    if kv_dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"kv_dtype={kv_dtype!r}: use 'float32', 'bfloat16' or 'float16'")
    return kv_dtype


def _check_finite(logprobs_BxM: np.ndarray, lengths_B: np.ndarray) -> None:
    """Raise on a NaN or infinite behaviour log-prob: the model's logits were garbage."""
    generated_BxM = np.arange(logprobs_BxM.shape[1]) < lengths_B[:, None]
    bad_BxM = generated_BxM & ~np.isfinite(logprobs_BxM)
    if bad_BxM.any():
        row, step = np.argwhere(bad_BxM)[0]
        raise FloatingPointError(
            f"the model's logits are not finite (sample {row}, new token {step}; "
            f"{int(bad_BxM.sum())} tokens in all): its weights have diverged or overflowed. "
            "Check the trainer's loss and grad norm, and resume from an earlier checkpoint"
        )


def compile_count() -> int:
    """How many (shape, static-argument) variants of the sampler have been compiled so far."""
    from jaxsd.models.continuous import generate_slots

    return _generate_padded._cache_size() + generate_slots._cache_size()
