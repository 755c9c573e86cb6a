"""Forward and KV-cache decode throughput of jaxsd.models vs transformers' PyTorch, same weights.

Prints one JSON object. Usage: .venv/bin/python bench/model_forward.py [--batch 8 --seq 128 ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from jaxsd.models import from_pretrained


def _time(fn, repeats: int) -> float:
    """Median wall seconds of `fn()` after one warm-up call (compiles / allocates)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = transformers.Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
        head_dim=args.hidden // 8, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, _ = from_pretrained(d)
    graphdef, state = nnx.split(model)
    b, t = args.batch, args.seq
    ids = np.random.RandomState(0).randint(0, args.vocab, (b, t))

    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    jax_fwd = _time(lambda: fwd(state, ids).block_until_ready(), args.repeats)
    ids_t = torch.tensor(ids)
    with torch.no_grad():
        torch_fwd = _time(lambda: hf(input_ids=ids_t).logits, args.repeats)
        diff = float(np.abs(hf(input_ids=ids_t).logits.numpy() - np.asarray(fwd(state, ids))).max())

    p, n = args.prompt, args.new_tokens
    prompt = ids[:, :p]
    dec = jax.jit(lambda s, x, pos, c, m: nnx.merge(graphdef, s).decode(x, pos, c, m))

    def jax_decode() -> None:
        cache = model.init_cache(b, p + n)
        mask = jnp.zeros((b, p + n), jnp.int32).at[:, :p].set(1)
        pos = jnp.broadcast_to(jnp.arange(p), (b, p))
        logits, cache = dec(state, prompt, pos, cache, mask)
        tok = jnp.argmax(logits[:, -1:], -1)
        for i in range(n):  # greedy, one token per step
            mask = mask.at[:, p + i].set(1)
            logits, cache = dec(state, tok, jnp.full((b, 1), p + i), cache, mask)
            tok = jnp.argmax(logits[:, -1:], -1)
        tok.block_until_ready()

    def torch_decode() -> None:
        with torch.no_grad():
            out = hf(input_ids=torch.tensor(prompt), use_cache=True)
            tok, cache = out.logits[:, -1:].argmax(-1), out.past_key_values
            for _ in range(n):
                out = hf(input_ids=tok, past_key_values=cache, use_cache=True)
                tok, cache = out.logits[:, -1:].argmax(-1), out.past_key_values

    jax_dec = _time(jax_decode, args.repeats)
    torch_dec = _time(torch_decode, args.repeats)
    print(json.dumps({
        "device": jax.devices()[0].platform,
        "params": sum(p.numel() for p in hf.parameters()),
        "shape": vars(args),
        "forward_tokens_per_s": {"jax": b * t / jax_fwd, "torch": b * t / torch_fwd},
        "decode_tokens_per_s": {"jax": b * n / jax_dec, "torch": b * n / torch_dec},
        "decode_note": "prefill of prompt tokens + new_tokens greedy steps; counts new tokens",
        "logits_max_abs_diff": diff,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
