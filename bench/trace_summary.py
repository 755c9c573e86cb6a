"""Per-kernel time of a jax.profiler perfetto trace: where a device step spends its time.

    python bench/trace_summary.py TRACE_DIR [--top 40] [--hlo AFTER_OPTIMIZATIONS.txt]

Prints one JSON object: total device-busy ms per process (device stream) and the top ops by
total duration, summed over the traced steps. With `--hlo` (the `*after_optimizations.txt`
that `XLA_FLAGS=--xla_dump_to=DIR` writes for the same program) also `dot_fusions`: each fused
matmul's FLOPs per call, call count, time and GFLOP/s, which is how a GEMM running at half the
machine's speed shows up. On CPU, XLA runs independent ops concurrently, so two overlapping
GEMMs each show about half their solo rate. Plain Python (json + gzip + re).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import re
from pathlib import Path

_COMPUTATION = re.compile(r"^%(\S+) \(.*?\) -> .*? \{\n(.*?)^\}", re.S | re.M)
_FUSION_CALL = re.compile(r"^\s+(?:ROOT )?%(\S+) = .*? fusion\(.*?calls=%([^,\s]+)", re.M)


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def dot_flops_by_fusion(hlo_text: str) -> dict[str, dict]:
    """{fusion instruction name: {"gflop": per call, "dots": shapes}} for fusions holding dots.

    FLOPs of a dot = 2 · (output elements) · (product of the lhs contracting dims).
    """
    computations = {}
    for m in _COMPUTATION.finditer(hlo_text):
        body, gflop, shapes = m.group(2), 0.0, []
        for line in body.splitlines():
            dot = re.search(r"= \w+\[([\d,]*)\]\S* dot\(%(\S+?), %(\S+?)\)", line)
            if not dot:
                continue
            lhs = re.search(r"%" + re.escape(dot.group(2)) + r" = \w+\[([\d,]*)\]", body)
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
            if not lhs or not contracting:
                continue
            lhs_dims, out_dims = _dims(lhs.group(1)), _dims(dot.group(1))
            k = math.prod(lhs_dims[i] for i in _dims(contracting.group(1)))
            gflop += 2 * math.prod(out_dims) * k / 1e9
            shapes.append(f"out{out_dims} K={k}")
        if gflop:
            computations[m.group(1)] = {"gflop": gflop, "dots": shapes}
    return {
        m.group(1): computations[m.group(2)]
        for m in _FUSION_CALL.finditer(hlo_text)
        if m.group(2) in computations
    }


def dot_rates(events: list[dict], flops: dict[str, dict], top: int) -> list[dict]:
    """Per dot fusion: calls, total ms, GFLOP/s (per-call FLOPs / mean call time)."""
    ms: dict[str, float] = collections.Counter()
    calls: dict[str, int] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and e.get("name") in flops:
            ms[e["name"]] += e["dur"] / 1e3
            calls[e["name"]] += 1
    rows = [
        {
            "op": name,
            "ms": round(total, 3),
            "n": calls[name],
            "gflop_per_call": round(flops[name]["gflop"], 4),
            "gflops": round(flops[name]["gflop"] * calls[name] / (total / 1e3), 1),
            "dots": flops[name]["dots"],
        }
        for name, total in ms.items()
        if total > 0
    ]
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def _events(trace_dir: Path) -> tuple[Path, list[dict]]:
    files = sorted(trace_dir.rglob("*perfetto_trace.json.gz"))
    if not files:
        raise SystemExit(f"no perfetto_trace.json.gz under {trace_dir}; run with --trace")
    events = json.loads(gzip.decompress(files[-1].read_bytes()))
    return files[-1], events.get("traceEvents", events)


def summarise(trace_dir: Path, top: int, hlo: Path | None = None) -> dict:
    trace_file, events = _events(trace_dir)
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
    out = {
        "trace": str(trace_file),
        "ms_per_process": {p: round(v, 2) for p, v in by_proc.items()},
        "top_device_ops": [
            {"proc": k[0][-30:], "op": k[1][:120], "ms": round(v, 3), "n": count[k]}
            for k, v in ops[:top]
        ],
    }
    if hlo is not None:
        out["dot_fusions"] = dot_rates(events, dot_flops_by_fusion(hlo.read_text()), top)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace_dir", type=Path)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--hlo", type=Path, help="the program's *after_optimizations.txt HLO dump")
    a = p.parse_args()
    if a.hlo is not None and not a.hlo.is_file():
        raise SystemExit(f"--hlo {a.hlo}: no such file (dump with XLA_FLAGS=--xla_dump_to=DIR)")
    print(json.dumps(summarise(a.trace_dir, a.top, a.hlo), indent=1))


if __name__ == "__main__":
    main()
