"""Benchmark: time from "step N saved" to "worker generating with step N" vs parameter bytes.

For each model size it writes a random-init Qwen3 HF folder, starts one vLLM rollout worker,
and repeats: publish step N (Orbax save) -> load_weights(N) (worker restores on host and
reloads in place) -> generate one token (the first rollout with step N). It also times the
restart fallback once per size, and sequential disk write (+fsync) and read speed of a file
as large as each model, for comparison. Prints one JSON object.

The goal (issue 9): save + restore + load + first token <= 2x the disk bound, where the disk
bound is param_bytes / write speed + param_bytes / read speed. The read is measured twice:
from the page cache (where the worker finds a step just written on the same machine) and
after posix_fadvise(DONTNEED) drops the file's pages (a cold read, as from shared storage;
dropping the whole page cache needs privileges a container may not have). The page-cache
bound (write without fsync + warm read) is reported too: publish_weights leaves write-back
to the OS by default, so that is the floor it is measured against as well.

    .venv/bin/python bench/weight_exchange.py --sizes=tiny,small,medium --reps=3 --baseline

`--compare-ram` runs every size twice, publishing to the work folder on disk and to a folder in
RAM (/dev/shm, what `rollout.weights_dir=auto` uses), in alternating order per size, and
reports `ram_vs_disk`: the disk median over the RAM median of save -> generating.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from peers.workload import random_qwen3_folder  # noqa: E402

from jaxsd.rollout.weights import RAM_ROOT  # noqa: E402

# name -> (hidden, layers, heads, kv_heads, head_dim, intermediate, vocab)
SIZES = {
    "tiny": (64, 2, 4, 2, 32, 128, 1024),
    "small": (256, 4, 8, 4, 32, 768, 8192),
    "medium": (512, 8, 8, 4, 64, 1536, 32768),
    "large": (1024, 12, 16, 8, 64, 3072, 65536),
    "0.6b": (1024, 28, 16, 8, 128, 3072, 151936),  # Qwen3-0.6B, untied head
}


def _fields(size: str) -> dict[str, int]:
    hidden, layers, heads, kv, head_dim, inter, vocab = SIZES[size]
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim,
    )  # fmt: skip


def make_model(path: pathlib.Path, size: str) -> dict[str, np.ndarray]:
    """A random Qwen3 HF folder (no tokenizer: the worker takes token ids); its state dict."""
    model = random_qwen3_folder(path, _fields(size))
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def random_state(size: str, dtype: str) -> dict[str, np.ndarray]:
    """A random HF-named Qwen3 state dict of `size` without building the model (shapes from a
    meta-device model), for the engine-less run."""
    import ml_dtypes
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        meta = Qwen3ForCausalLM(Qwen3Config(**_fields(size), tie_word_embeddings=False))
    rng = np.random.default_rng(0)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return {
        name: rng.standard_normal(tuple(t.shape), dtype=np.float32).astype(np_dtype)
        for name, t in meta.state_dict().items()
    }


def bench_size_without_engine(size: str, root: pathlib.Path, reps: int, dtype: str) -> dict:
    """Publish (no fsync, alternating with fsync=True) and restore on host as the worker does,
    no vLLM: the Orbax part of the exchange, e.g. on a machine without vLLM."""
    from jaxsd.rollout import publish_weights, restore_weights

    state = random_state(size, dtype)
    param_bytes = int(sum(v.nbytes for v in state.values()))
    weights_dir = root / size / "weights"
    publishers = {
        "publish_weights": publish_weights,
        "publish_weights_fsync": functools.partial(publish_weights, fsync=True),
    }
    rows = []
    for step in range(2 * reps + 1):
        name = "warm-up" if step == 0 else list(publishers)[(step - 1) % 2]
        t0 = time.perf_counter()
        publishers.get(name, publish_weights)(state, weights_dir, step, keep=2)
        t1 = time.perf_counter()
        restored = restore_weights(weights_dir, step)
        t2 = time.perf_counter()
        assert restored.keys() == state.keys()
        rows.append({"step": step, "publisher": name, "save_s": t1 - t0, "restore_s": t2 - t1})
        del restored

    def medians(name: str) -> dict:
        out = _medians([r for r in rows if r["publisher"] == name], ("save_s", "restore_s"))
        out["median_save_to_generating_s"] = out["median_save_s"] + out["median_restore_s"]
        return out

    return {
        "size": size,
        "dtype": dtype,
        "param_bytes": param_bytes,
        "engine": None,
        **medians("publish_weights"),
        "baseline_fsync": medians("publish_weights_fsync"),
        "baseline_orbax_defaults": None,
        "steps": rows,
    }


def _read_s(path: pathlib.Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    return time.perf_counter() - t0


def disk_speed(directory: pathlib.Path, num_bytes: int, reps: int = 3) -> dict[str, float]:
    """Median sequential write (+fsync), write into the page cache (no fsync), page-cache read
    and cold read (DONTNEED) of a file."""
    data = np.random.default_rng(0).integers(0, 255, num_bytes, dtype=np.uint8).tobytes()
    path = directory / "disk_speed.bin"
    write, cached_write, warm, cold = [], [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            f.write(data)
        cached_write.append(time.perf_counter() - t0)
        path.unlink()
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        write.append(time.perf_counter() - t0)
        warm.append(_read_s(path))
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages leave the cache
        os.close(fd)
        cold.append(_read_s(path))
        path.unlink()
    mb = num_bytes / 1e6
    return {
        "bytes": num_bytes,
        "write_MBps": mb / float(np.median(write)),
        "page_cache_write_MBps": mb / float(np.median(cached_write)),
        "read_MBps": mb / float(np.median(warm)),
        "cold_read_MBps": mb / float(np.median(cold)),
    }


def against_disk(result: dict, medians: dict, disk: dict) -> dict:
    """A publisher's save-to-generating time vs the size's disk bound (write + fsync, then a
    warm or a cold read: the issue's bound) and vs the page-cache bound (write without fsync +
    warm read), the floor of a publisher that leaves write-back to the OS."""
    mb = result["param_bytes"] / 1e6
    bound = mb / disk["write_MBps"] + mb / disk["read_MBps"]
    cold_bound = mb / disk["write_MBps"] + mb / disk["cold_read_MBps"]
    page_cache_bound = mb / disk["page_cache_write_MBps"] + mb / disk["read_MBps"]
    total = medians["median_save_to_generating_s"]
    return {
        "exchange_MBps": mb / total,
        "disk_bound_s": bound,
        "ratio_to_disk_bound": total / bound,
        "cold_disk_bound_s": cold_bound,
        "ratio_to_cold_disk_bound": total / cold_bound,
        "page_cache_bound_s": page_cache_bound,
        "ratio_to_page_cache_bound": total / page_cache_bound,
    }


def publish_orbax_defaults(state: dict, weights_dir: pathlib.Path, step: int, keep: int) -> None:
    """The publisher before the tuning (StandardCheckpointer defaults); keeps every step."""
    import orbax.checkpoint as ocp

    from jaxsd.rollout.weights import step_path

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(step_path(weights_dir, step).absolute(), state, force=True)
        checkpointer.wait_until_finished()


_ENGINE_KEYS = (
    "save_s", "worker_restore_s", "worker_reload_s", "saved_to_generating_s",
    "save_to_generating_s",
)  # fmt: skip


def _medians(rows: list[dict], keys: tuple[str, ...] = _ENGINE_KEYS) -> dict:
    """{"reps": n, "median_<key>": ...} over `rows` for each of `keys`."""
    medians = {f"median_{k}": float(np.median([r[k] for r in rows])) for k in keys}
    return {"reps": len(rows), **medians}


def bench_size(size: str, root: pathlib.Path, reps: int, baseline: bool = False) -> dict:
    """Step 1 warms the worker up (its first load imports Orbax) and is left out of the medians;
    then `reps` in-place steps per publisher (alternating with the baseline when asked, so both
    see the same machine load), then one step through the restart fallback."""
    from jaxsd.rollout import SamplingConfig, VllmEngine, VllmWorkerConfig, publish_weights

    (root / size).mkdir(parents=True, exist_ok=True)
    publishers = {"publish_weights": publish_weights}
    if baseline:
        publishers["publish_weights_fsync"] = functools.partial(publish_weights, fsync=True)
        publishers["orbax_defaults"] = publish_orbax_defaults
    names = ["publish_weights"] + [n for _ in range(reps) for n in publishers] + ["restart"]
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
        for step, name in enumerate(names, start=1):
            in_place = name != "restart"
            publish = publishers.get(name, publish_weights)
            new = {k: v + np.float32(1e-3 * step) for k, v in state.items()}
            t0 = time.perf_counter()
            publish(new, weights_dir, step, keep=2)
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
                    "publisher": name if step > 1 else "warm-up",
                    "mode": load["mode"],
                    "save_s": t1 - t0,
                    "load_ack_s": t2 - t1,
                    "worker_restore_s": load.get("restore_s"),
                    "worker_reload_s": load.get("reload_s"),
                    "first_generate_s": t3 - t2,
                    "saved_to_generating_s": t3 - t1,
                    "save_to_generating_s": t3 - t0,
                }
            )
    finally:
        engine.close()
    by_publisher = {n: _medians([r for r in rows if r["publisher"] == n]) for n in publishers}
    return {
        "size": size,
        "param_bytes": param_bytes,
        "num_params": param_bytes // 4,
        "worker_start_s": start_s,
        **by_publisher["publish_weights"],
        "restart_fallback_saved_to_generating_s": rows[-1]["saved_to_generating_s"],
        "baseline_fsync": by_publisher.get("publish_weights_fsync"),
        "baseline_orbax_defaults": by_publisher.get("orbax_defaults"),
        "steps": rows,
    }


def compare_ram(size: str, disk_root: pathlib.Path, reps: int) -> dict:
    """`bench_size` with the work folder on disk and in RAM, in alternating order by size."""
    with tempfile.TemporaryDirectory(dir=RAM_ROOT) as ram:
        roots = {"disk": disk_root / "disk", "ram": pathlib.Path(ram)}
        order = ["disk", "ram"] if list(SIZES).index(size) % 2 == 0 else ["ram", "disk"]
        runs = {where: bench_size(size, roots[where], reps) for where in order}
    result = dict(runs["disk"])
    key = "median_save_to_generating_s"
    result["ram"] = {k: v for k, v in runs["ram"].items() if k != "steps"}
    result["ram_vs_disk"] = {
        "disk_s": runs["disk"][key], "ram_s": runs["ram"][key],
        "speedup": runs["disk"][key] / runs["ram"][key], "order": order,
    }  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small,medium", help=f"comma list of {list(SIZES)}")
    parser.add_argument("--reps", type=int, default=3, help="in-place publishes per size")
    parser.add_argument("--dir", default="", help="work folder (default: a temporary one)")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="alternate steps with publish_weights(fsync=True) and with StandardCheckpointer "
        "defaults (the untuned publisher)",
    )
    parser.add_argument(
        "--no-engine",
        action="store_true",
        help="no vLLM: time the save and the worker's restore only (`median_save_to_generating_s`"
        " is then save + restore)",
    )
    parser.add_argument(
        "--compare-ram",
        action="store_true",
        help="each size on disk and in RAM (/dev/shm), alternating; reports the ratio",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="tensor dtype with --no-engine (the vLLM runs save the fp32 HF model)",
    )
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        raise SystemExit(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        root = pathlib.Path(tmp)
        if args.compare_ram:
            results = [compare_ram(s, root, args.reps) for s in sizes]
        elif args.no_engine:
            results = [bench_size_without_engine(s, root, args.reps, args.dtype) for s in sizes]
        else:
            results = [bench_size(s, root, args.reps, args.baseline) for s in sizes]
        for r in results:  # per size: for small files fsync latency, not bandwidth, dominates
            r["disk"] = disk_speed(root, r["param_bytes"])
    for r in results:
        r.update(against_disk(r, r, r["disk"]))
        for key in ("baseline_fsync", "baseline_orbax_defaults"):
            if r[key]:
                r[key].update(against_disk(r, r[key], r["disk"]))
    out = {
        "benchmark": "weight_exchange",
        "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]],
        "sizes": results,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
