"""Embedded sampler throughput: jaxsd.models.sampler.generate vs transformers' generate.

Both sample prompts x n rows for exactly `--new_tokens` tokens (no stop ids) with the same
temperature / top-p on the same random-init tiny Qwen3 (jaxsd.models.tiny). Prints one
JSON object: new tokens per second (median of repeats, after one warm-up call; the JAX
warm-up is the compile, reported separately).

Usage: .venv/bin/python bench/sampler.py [--prompts 4 --n 4 --new_tokens 64 --hidden 256 ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
from transformers import AutoModelForCausalLM

from jaxsd.models import sampler
from jaxsd.models.io import from_pretrained
from jaxsd.models.tiny import make_tiny_model


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top_p", type=float, default=0.95)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch_threads", type=int, default=0, help="0 = torch's default")
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory() as folder:
        make_tiny_model(
            folder, hidden_size=args.hidden, num_layers=args.layers, head_dim=args.hidden // 4,
            intermediate_size=3 * args.hidden,
        )  # fmt: skip
        model, config = from_pretrained(folder)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rng = np.random.RandomState(0)
    prompts = rng.randint(0, 1000, (args.prompts, args.prompt_len)).tolist()
    rows, m = args.prompts * args.n, args.new_tokens
    kw = dict(n=args.n, max_new_tokens=m, temperature=args.temperature, top_p=args.top_p)

    def jax_run() -> sampler.SampleOutput:
        return sampler.generate(model, prompts, **kw)

    start = time.perf_counter()
    jax_run()
    compile_s = time.perf_counter() - start
    jax_s = _median_seconds(jax_run, args.repeats)

    ids = torch.tensor(prompts).repeat_interleave(args.n, dim=0)

    def torch_run() -> None:
        with torch.no_grad():
            hf.generate(
                ids, do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                max_new_tokens=m, min_new_tokens=m, pad_token_id=0,
            )  # fmt: skip

    torch_run()
    torch_s = _median_seconds(torch_run, args.repeats)
    print(
        json.dumps(
            {
                "device": jax.devices()[0].platform,
                "params": config.num_params(),
                "shape": vars(args),
                "rows": rows,
                "decode_tokens_per_s": {
                    "jax_sampler": rows * m / jax_s,
                    "torch_generate": rows * m / torch_s,
                },
                "jax_first_call_s_incl_compile": compile_s,
                "jax_compiles": sampler.compile_count(),
                "note": "new tokens only, prefill included; torch uses min_new_tokens=max",
            }
        )
    )


if __name__ == "__main__":
    main()
