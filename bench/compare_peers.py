"""Train-step throughput, ours vs the peers (TRL/PyTorch, tunix), same workload, one run.

Runs, one after another on the same machine (never concurrently: they would share the cores):
- ours: bench/train_step.py in jaxsd's .venv, once per algorithm (`--algos sdpo,grpo`);
- trl: bench/peers/trl_step.py in the throwaway `trl` venv (torch SDPO, TRL GKD, TRL GRPO);
- tunix: bench/peers/tunix_step.py in the throwaway `tunix` venv (tunix's GRPO learner loss).
The venvs are created under --venv-root on first use (minutes) and reused after; they hold
the peer versions the README's figures were measured with (`bench/peers/venvs.py` PINNED), or
with `--latest-peers` the newest releases (`<name>-latest` venvs).
Prints one JSON object with every record and, per algorithm, `ratios` = our tokens/s / the
peer's tokens/s (SDPO only against SDPO peer steps, GRPO only against GRPO ones).

This shared 2-core machine drifts by 15-25 % over an hour, peers included, so one run's ratio
can be off by that much. `--rounds N` repeats the whole set N times, alternating the order
(ours first, then peers first, ...), and reports per peer the median ratio over rounds with its
[min, max]; `rounds` keeps every round's records.

Usage: .venv/bin/python bench/compare_peers.py --shape tiny --steps 5 [--rounds 3] [--skip-install]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "peers"))
import venvs  # noqa: E402

PEERS = {"trl": "trl_step.py", "tunix": "tunix_step.py"}


def _last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def run_json(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a bench script; its last stdout line is its JSON record (or an error record)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
                              env=env)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s: {' '.join(cmd)}"}
    record = _last_json(proc.stdout) if proc.returncode == 0 else None
    if record is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {tail}", "cmd": " ".join(cmd)}
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    return record


def run_ours(args: argparse.Namespace, algo: str) -> dict[str, Any]:
    py = ROOT / ".venv" / "bin" / "python"
    cmd = [str(py), str(ROOT / "bench" / "train_step.py"), "--shape", args.shape,
           "--algo", algo, "--steps", str(args.steps)]  # fmt: skip
    return run_json(cmd, args.timeout_s)


def run_peer(name: str, args: argparse.Namespace) -> dict[str, Any]:
    env_info = venvs.ensure(
        name, args.venv_root, skip_install=args.skip_install, latest=args.latest_peers
    )
    if "error" in env_info:
        return {"peer": name, "install_error": env_info["error"]}
    cmd = [env_info["python"], str(ROOT / "bench" / "peers" / PEERS[name]),
           "--shape", args.shape, "--steps", str(args.steps)]  # fmt: skip
    # The peer venvs must not see jaxsd's .venv packages through an inherited PYTHONPATH.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    record = run_json(cmd, args.timeout_s, env=env)
    record.setdefault("peer", name)
    record["venv"] = env_info
    return record


def _peer_rates(record: dict[str, Any], algorithm: str) -> dict[str, float]:
    """{peer/variant: response tokens/s} of the variants of `algorithm` that measured something."""
    return {f"{record['peer']}/{name}": v["response_tokens_per_s"]
            for name, v in record.get("variants", {}).items()
            if "response_tokens_per_s" in v and v.get("algorithm") == algorithm}  # fmt: skip


def ratios(ours: dict[str, Any], peers: list[dict[str, Any]]) -> dict[str, Any]:
    """ours / peer tokens/s, only against peer steps of the same algorithm as ours.

    An SDPO step (two forwards, top-k JSD, EMA) does more work than a GRPO learner step (one
    forward, no teacher), so each of our rows is compared with peers of its own algorithm.
    """
    algorithm = ours.get("algorithm", "sdpo")
    rates = {k: v for p in peers for k, v in _peer_rates(p, algorithm).items()}
    if "response_tokens_per_s" not in ours or not rates:
        return {"note": f"need our {algorithm} number and a peer {algorithm} number for ratios"}
    mine = ours["response_tokens_per_s"]
    fastest = max(rates, key=rates.get)
    return {
        "algorithm": algorithm,
        "ours_over_peer_tokens_per_s": {k: mine / v for k, v in rates.items()},
        "fastest_peer": fastest,
        "ours_over_fastest_peer": mine / rates[fastest],
    }


def median_ratios(per_round: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine one algorithm's `ratios` from several rounds: per peer the median over rounds
    and its [min, max]; the fastest peer is the one with the smallest median ratio."""
    by_peer: dict[str, list[float]] = {}
    for r in per_round:
        for peer, x in r.get("ours_over_peer_tokens_per_s", {}).items():
            by_peer.setdefault(peer, []).append(x)
    if not by_peer:
        return {"note": "no round produced a ratio", "rounds": len(per_round)}
    med = {peer: statistics.median(xs) for peer, xs in by_peer.items()}
    fastest = min(med, key=med.get)
    return {
        "algorithm": per_round[0].get("algorithm"),
        "ours_over_peer_tokens_per_s": med,
        "spread": {peer: [min(xs), max(xs)] for peer, xs in by_peer.items()},
        "rounds_with_ratio": {peer: len(xs) for peer, xs in by_peer.items()},
        "fastest_peer": fastest,
        "ours_over_fastest_peer": med[fastest],
    }


def summary_table(ratios_by_algo: dict[str, dict[str, Any]]) -> str:
    """A markdown table of the record's ratios for people (stderr); the JSON stays the record.

    One row per algorithm and peer: ours / peer tokens/s (the median over rounds, with its
    [min, max] when there were several), the fastest peer's row marked.
    """
    lines = ["| algorithm | peer | ours / peer | spread |", "| --- | --- | ---: | --- |"]
    for algo, r in ratios_by_algo.items():
        per_peer = r.get("ours_over_peer_tokens_per_s")
        if not per_peer:
            lines.append(f"| {algo} | – | – | {r.get('note', 'no ratio')} |")
            continue
        for peer, x in sorted(per_peer.items(), key=lambda kv: kv[1]):
            low_high = r.get("spread", {}).get(peer)
            spread = f"[{low_high[0]:.2f}, {low_high[1]:.2f}]" if low_high else "one round"
            name = f"**{peer}** (fastest)" if peer == r["fastest_peer"] else peer
            lines.append(f"| {algo} | {name} | {x:.2f}× | {spread} |")
    return "\n".join(lines)


def one_round(
    args: argparse.Namespace, algos: list[str], names: list[str], peers_first: bool
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Our rows and the peers' rows once, in the order asked for."""

    def ours() -> dict[str, Any]:
        return {a: {"error": "skipped (--no-ours)"} if args.no_ours else run_ours(args, a)
                for a in algos}  # fmt: skip

    if peers_first:
        peers = [run_peer(n, args) for n in names]
        mine = ours()
    else:
        mine = ours()
        peers = [run_peer(n, args) for n in names]
    return mine, peers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=("tiny", "small"))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (median)")
    ap.add_argument("--skip-install", action="store_true", help="reuse existing peer venvs only")
    ap.add_argument("--venv-root", type=Path, default=venvs.DEFAULT_ROOT)
    ap.add_argument(
        "--latest-peers",
        action="store_true",
        help="newest peer releases in <name>-latest venvs instead of the pinned versions",
    )
    ap.add_argument("--peers", default=",".join(PEERS), help=f"subset of {sorted(PEERS)}")
    ap.add_argument("--no-ours", action="store_true", help="run the peers only")
    ap.add_argument("--algos", default="sdpo,grpo", help="our algorithms to run (sdpo,grpo)")
    ap.add_argument("--timeout-s", type=float, default=1800, help="per bench script")
    ap.add_argument("--rounds", type=int, default=1, help="repeat all, alternating the order")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds} must be >= 1")
    names = [p for p in args.peers.split(",") if p]
    if set(names) - set(PEERS):
        ap.error(f"unknown --peers {sorted(set(names) - set(PEERS))}; use {sorted(PEERS)}")
    algos = [a for a in args.algos.split(",") if a]
    if set(algos) - {"sdpo", "grpo"}:
        ap.error(f"unknown --algos {sorted(set(algos) - {'sdpo', 'grpo'})}; use sdpo,grpo")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_before = os.getloadavg()
    rounds = []
    for i in range(args.rounds):
        ours, peers = one_round(args, algos, names, peers_first=i % 2 == 1)
        rounds.append({
            "ours": ours, "peers": peers, "loadavg": os.getloadavg(),
            "ratios": {a: ratios(ours[a] | {"algorithm": a}, peers) for a in algos},
        })  # fmt: skip
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    record = {
        "bench": "compare_peers", "started": started, "shape": args.shape, "steps": args.steps,
        "cpu_count": os.cpu_count(), "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(), "ours": rounds[0]["ours"], "peers": rounds[0]["peers"],
        "ratios": rounds[0]["ratios"],
    }  # fmt: skip
    if args.rounds > 1:
        record["rounds"] = rounds
        record["ratios"] = {a: median_ratios([r["ratios"][a] for r in rounds]) for a in algos}
    print(summary_table(record["ratios"]), file=sys.stderr, flush=True)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
