"""Per-kernel time of a jax.profiler perfetto trace: where a device step spends its time.

    python bench/trace_summary.py TRACE_DIR [--top 40]

Prints one JSON object: total device-busy ms per process (device stream) and the top ops by
total duration, summed over the traced steps. Plain Python (json + gzip).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path


def summarise(trace_dir: Path, top: int) -> dict:
    files = sorted(trace_dir.rglob("*perfetto_trace.json.gz"))
    if not files:
        raise SystemExit(f"no perfetto_trace.json.gz under {trace_dir}; run with --trace")
    events = json.loads(gzip.decompress(files[-1].read_bytes()))
    events = events.get("traceEvents", events)
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}  # fmt: skip
    by_proc: dict[str, float] = collections.Counter()
    by_op: dict[tuple[str, str], float] = collections.Counter()
    count: dict[tuple[str, str], int] = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        proc = names.get(e.get("pid"), str(e.get("pid")))
        by_proc[proc] += e["dur"] / 1e3
        by_op[(proc, e["name"])] += e["dur"] / 1e3
        count[(proc, e["name"])] += 1
    device = [p for p in by_proc if "GPU" in p or "TPU" in p or "device" in p.lower()]
    device = device or list(by_proc)  # CPU runs: the host is the device
    ops = sorted(((k, v) for k, v in by_op.items() if k[0] in device), key=lambda kv: -kv[1])
    return {
        "trace": str(files[-1]),
        "ms_per_process": {p: round(v, 2) for p, v in by_proc.items()},
        "top_device_ops": [
            {"proc": k[0][-30:], "op": k[1][:120], "ms": round(v, 3), "n": count[k]}
            for k, v in ops[:top]
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace_dir", type=Path)
    p.add_argument("--top", type=int, default=40)
    a = p.parse_args()
    print(json.dumps(summarise(a.trace_dir, a.top), indent=1))


if __name__ == "__main__":
    main()
