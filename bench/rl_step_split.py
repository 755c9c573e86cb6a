"""Per-step time split of a training run, from its `metrics.jsonl` (`bench/gpu_rl_step.sh`).

    python bench/rl_step_split.py RUN_DIR

Prints one JSON object: per step the split (rollout, verify, teacher forward, train step,
publish, eval, the rest of the step) and peak device memory, and the mean over the steps
after the first (which pays the compiles) with the rollout's share of the step time.
`time/teacher_forward_s` is a separate, extra pass (`profile_teacher_forward`) run inside the
step before the train step, whose fused program contains the same forward again: the train
step alone is `train`, and the teacher's share of it is about `teacher_forward`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from jaxsd.metrics import read_metrics

PARTS = ("rollout", "verify", "teacher_forward", "train", "publish", "eval")


def step_split(row: dict[str, Any]) -> dict[str, float]:
    """One metrics row -> {part: seconds}; `other` = step time the named parts leave out."""
    split = {p: float(row.get(f"time/{p}_s", 0.0)) for p in PARTS}
    # time/step_s spans rollout .. publish, the lone teacher pass included, not the eval
    inside = sum(split[p] for p in PARTS if p != "eval")
    split["step"] = float(row["time/step_s"])
    split["other"] = split["step"] - inside
    if "mem/device_peak_bytes" in row:  # GPU/TPU; the CPU backend keeps no such statistic
        split["peak_device_gib"] = float(row["mem/device_peak_bytes"]) / 2**30
    return split


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [r for r in rows if "time/step_s" in r]
    if not steps:
        raise ValueError("no step rows with time/step_s in the metrics; did the run train?")
    splits = [{"step_index": int(r["step"]), **step_split(r)} for r in steps]
    steady = splits[1:] or splits
    mean = {k: sum(s[k] for s in steady) / len(steady) for k in steady[0] if k != "step_index"}
    return {
        "steps": splits,
        "mean_after_first": mean,
        "rollout_share_of_step": mean["rollout"] / mean["step"],
    }


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python bench/rl_step_split.py RUN_DIR")
    print(json.dumps(summarize(read_metrics(argv[1]))))


if __name__ == "__main__":
    main(sys.argv)
