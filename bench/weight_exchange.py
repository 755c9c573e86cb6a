"""Benchmark: time from "step N saved" to "worker generating with step N" vs parameter bytes.

For each model size it writes a random-init Qwen3 HF folder, starts one vLLM rollout worker,
and repeats: publish step N (Orbax save) -> load_weights(N) (worker restores on host and
reloads in place) -> generate one token (the first rollout with step N). It also times the
restart fallback once per size, and sequential disk write (+fsync) and read speed of a file
as large as the biggest model, for comparison. Prints one JSON object.

    .venv/bin/python bench/weight_exchange.py --sizes=tiny,small,medium --reps=3
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

import numpy as np

# name -> (hidden, layers, heads, kv_heads, head_dim, intermediate, vocab)
SIZES = {
    "tiny": (64, 2, 4, 2, 32, 128, 1024),
    "small": (256, 4, 8, 4, 32, 768, 8192),
    "medium": (512, 8, 8, 4, 64, 1536, 32768),
    "large": (1024, 12, 16, 8, 64, 3072, 65536),
}


def make_model(path: pathlib.Path, size: str) -> dict[str, np.ndarray]:
    """A random Qwen3 HF folder (no tokenizer: the worker takes token ids); its state dict."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hidden, layers, heads, kv, head_dim, inter, vocab = SIZES[size]
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        architectures=["Qwen3ForCausalLM"],
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.float32)
    model.save_pretrained(path)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def disk_speed(directory: pathlib.Path, num_bytes: int) -> dict[str, float]:
    """Sequential write (+fsync) and read of one file; the read may come from the page cache."""
    data = np.random.default_rng(0).integers(0, 255, num_bytes, dtype=np.uint8).tobytes()
    path = directory / "disk_speed.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    t1 = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    t2 = time.perf_counter()
    path.unlink()
    mb = num_bytes / 1e6
    return {"bytes": num_bytes, "write_MBps": mb / (t1 - t0), "read_MBps": mb / (t2 - t1)}


def bench_size(size: str, root: pathlib.Path, reps: int) -> dict:
    from jaxsd.rollout import SamplingConfig, VllmEngine, VllmWorkerConfig, publish_weights

    model_dir, weights_dir = root / size / "hf", root / size / "weights"
    state = make_model(model_dir, size)
    param_bytes = int(sum(v.nbytes for v in state.values()))
    t0 = time.perf_counter()
    engine = VllmEngine(
        VllmWorkerConfig(
            model_dir=str(model_dir),
            weights_dir=str(weights_dir),
            name=f"bench-{size}",
            max_model_len=256,
            cpu_threads=int(os.environ.get("BENCH_CPU_THREADS", "1")),
        )
    )
    start_s = time.perf_counter() - t0
    one_token = SamplingConfig(temperature=0.0, max_new_tokens=1)
    rows = []
    try:
        engine.generate([[1, 2, 3]], 1, one_token)  # warm-up at step 0
        for step in range(1, reps + 2):
            in_place = step <= reps  # the last step goes through the restart fallback
            new = {k: v + np.float32(1e-3 * step) for k, v in state.items()}
            t0 = time.perf_counter()
            publish_weights(new, weights_dir, step, keep=2)
            t1 = time.perf_counter()
            engine.load_weights(step, in_place=in_place)
            t2 = time.perf_counter()
            result = engine.generate([[1, 2, 3]], 1, one_token)
            t3 = time.perf_counter()
            assert result.weights_step == step
            load = engine.last_load
            rows.append(
                {
                    "step": step,
                    "mode": load["mode"],
                    "save_s": t1 - t0,
                    "load_ack_s": t2 - t1,
                    "worker_restore_s": load.get("restore_s"),
                    "worker_reload_s": load.get("reload_s"),
                    "first_generate_s": t3 - t2,
                    "saved_to_generating_s": t3 - t1,
                }
            )
    finally:
        engine.close()
    in_place_rows = [r for r in rows if r["mode"] == "in_place"]
    return {
        "size": size,
        "param_bytes": param_bytes,
        "num_params": param_bytes // 4,
        "worker_start_s": start_s,
        "median_save_s": float(np.median([r["save_s"] for r in in_place_rows])),
        "median_saved_to_generating_s": float(
            np.median([r["saved_to_generating_s"] for r in in_place_rows])
        ),
        "restart_fallback_saved_to_generating_s": rows[-1]["saved_to_generating_s"],
        "steps": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small,medium", help=f"comma list of {list(SIZES)}")
    parser.add_argument("--reps", type=int, default=3, help="in-place publishes per size")
    parser.add_argument("--dir", default="", help="work folder (default: a temporary one)")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        raise SystemExit(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        root = pathlib.Path(tmp)
        results = [bench_size(size, root, args.reps) for size in sizes]
        disk = disk_speed(root, max(r["param_bytes"] for r in results))
    print(json.dumps({"benchmark": "weight_exchange", "sizes": results, "disk": disk}, indent=1))


if __name__ == "__main__":
    main()
