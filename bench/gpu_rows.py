"""Summarise bench/gpu_rows.sh's rows.jsonl: a markdown table, ours vs the PyTorch peer.

    python bench/gpu_rows.py /tmp/gpu_rows_out/rows.jsonl > summary.md

Rows are paired by (algorithm, shape, layers, batch, prompt, response, dtypes); the ratio is
our response tokens/s over the peer's (> 1 = ours faster). Plain Python: no jax or torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

KEY = ("algorithm", "shape", "layers", "batch", "prompt", "response", "param_dtype",
       "compute_dtype")  # fmt: skip


def load(path: Path) -> list[dict[str, Any]]:
    """The JSON rows of `path`; a line that does not parse becomes an error row naming it."""
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.startswith("{"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append({"row": f"{path.name} line {number}", "error": f"not JSON ({e.msg})",
                         "stderr_tail": line[:300]})  # fmt: skip
            continue
        if "ab" in row:  # bench/gpu_ab.sh: the same row from two trees, told apart by name
            row["row"] = f"{row.get('row', row.get('skipped', '?'))} [{row['ab']}]"
        rows.append(row)
    return rows


def _gb(x: Any) -> str:
    return "–" if not x else f"{x / 2**30:.1f}"


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def step_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per step row, with ours/peer next to our row when the peer row exists."""
    steps = [r for r in rows if r.get("bench") in ("train_step", "torch_step")]
    peers = {tuple(r.get(k) for k in KEY): r for r in steps if r["bench"] == "torch_step"}
    out = [
        "| row | algo | shape (layers) | B × (P+R) | step s | resp tok/s | all tok/s | "
        "MFU 6N (nominal) | MFU model FLOPs (nominal / measured) | peak GB | first step s | "
        "ours / torch |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in steps:
        ratio = "–"
        peer = peers.get(tuple(r.get(k) for k in KEY))
        if r["bench"] == "train_step" and peer is not None:
            ratio = f"**{r['response_tokens_per_s'] / peer['response_tokens_per_s']:.2f}×**"
        measured = r.get("mfu_model_flops_vs_measured_matmul")
        out.append(
            f"| {r['row']} | {r['algorithm']} | {r['shape']} ({r['layers']}) | "
            f"{r['batch']} × ({r['prompt']}+{r['response']}) | {r['step_s']:.4f} | "
            f"{r['response_tokens_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | {_pct(r['mfu'])} | "
            f"{_pct(r['mfu_model_flops'])} / {_pct(measured)} | "
            f"{_gb(r.get('peak_device_bytes'))} | {r['first_step_s']:.1f} | {ratio} |"
        )
    return out


def head_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if r.get("bench") != "distillation_head":
            continue
        out.append(
            f"\n{r.get('row', 'head')}: head (V = {r['vocab']:,}, H = {r['hidden']}, {r['dtype']}, "
            f"{r['time_tokens']} tokens timed):"
        )
        out.append("| variant | fwd+bwd s | device peak GB (head only) | XLA buffer peak GB |")
        out.append("| --- | ---: | ---: | ---: |")
        for name, t in r["timing"].items():
            xla = r["memory"].get(name, {}).get("peak_bytes")
            time_s = f"{t['time_s']:.4f}" if "time_s" in t else t.get("error", "–")[:80]
            head_gb = _gb(t.get("device_head_peak_bytes"))
            out.append(f"| {name} | {time_s} | {head_gb} | {_gb(xla)} |")
        for k, v in r.items():
            if "ratio" in k and v is not None:
                out.append(f"- {k}: {v:.2f}")
    return out


def peer_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Peer rows (bench/peers/trl_step.py, tunix_step.py; the fixed workload): each variant
    against our fastest step row of the same algorithm, shape, depth and dtype at B 8 ×
    (128+128)."""
    out = []
    for r in rows:
        if "peer" not in r or "variants" not in r:
            continue
        ours_rows = [o for o in rows if o.get("bench") == "train_step"
                     and o.get("shape") == r["shape"] and o.get("compute_dtype") == r["dtype"]
                     and (o.get("batch"), o.get("prompt"), o.get("response")) == (8, 128, 128)
                     # rows written before peers recorded their depth: any depth
                     and r.get("layers", o.get("layers")) == o.get("layers")]  # fmt: skip
        out.append(f"\n{r['peer']} ({r['row']}: {r['shape']}, {r['dtype']}, {r['device']}, "
                   f"{r['versions']}):")  # fmt: skip
        out.append("| variant | algo | step s | resp tok/s | peak GB | ours row | ours / variant |")
        out.append("| --- | --- | ---: | ---: | ---: | --- | ---: |")
        for name, v in r["variants"].items():
            if "error" in v:
                out.append(f"| {name} | – | {v['error'][:120]} | | | | |")
                continue
            mine = [o for o in ours_rows if o.get("algorithm") == v["algorithm"]]
            best = max(mine, key=lambda o: o["response_tokens_per_s"], default=None)
            ratio = "–"
            if best is not None:
                ratio = f"**{best['response_tokens_per_s'] / v['response_tokens_per_s']:.2f}×**"
            out.append(
                f"| {name} | {v['algorithm']} | {v['step_s']:.4f} | "
                f"{v['response_tokens_per_s']:,.0f} | {_gb(v.get('device_peak_bytes'))} | "
                f"{'–' if best is None else best['row']} | {ratio} |"
            )
    return out


def other_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if r.get("bench") == "matmul_peak":
            out.append(
                f"- matmul {r['n']}³ {r['dtype']}: {r['tflops']:.0f} TFLOP/s measured "
                f"({_pct(r['fraction_of_nominal'])} of nominal {r['nominal_tflops']:.0f})"
            )
        elif r.get("bench") == "topk":
            times = ", ".join(f"{name} {ms:.2f}" for name, ms in r["ms"].items())
            out.append(
                f"- top-k {r['rows']} × {r['vocab']:,}, k {r['k']} (ms): {times}; "
                f"default {r['speedup_default']:.2f}× lax.top_k"
            )
        elif r.get("bench") == "rollout":
            speeds = ", ".join(
                f"{name} {e['tokens_per_s']:,.0f}" if "error" not in e else f"{name} {e['error']}"
                for name, e in r["engines"].items()
            )
            ratios = ", ".join(f"{k} {v:.2f}×" for k, v in r.items() if k.startswith("jax_over_"))
            agree = ", ".join(f"{k} {v:.2f}" for k, v in r["greedy_agreement"].items())
            out.append(
                f"- rollout {r['shape']} {r['dtype']}, {r['prompts'] * r['n']} rows × "
                f"{r['new_tokens']} new tokens (tokens/s): {speeds}; {ratios}; "
                f"greedy agreement {agree}"
            )
        elif "error" in r or "skipped" in r:
            out.append(f"- {r['row']}: {r.get('error') or r.get('skipped')} "
                       f"{r.get('stderr_tail', '')[:300]}")  # fmt: skip
        elif "peer" in r:
            continue  # peer_lines
        elif "versions" in r:
            out.append(f"- versions: {r['versions']}; devices {r['jax_devices']}")
        elif "torch" in r and "bench" not in r and "peer" not in r:
            out.append(f"- torch: {r}")
    return out


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/gpu_rows.py ROWS.jsonl")
    rows = load(Path(sys.argv[1]))
    lines = other_lines(rows) + [""] + step_table(rows) + head_lines(rows) + peer_lines(rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
