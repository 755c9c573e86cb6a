"""What a run shows about itself: start banner, device memory, sample completions, backends."""

from __future__ import annotations

import resource
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxsd import algorithms
from jaxsd import metrics as metrics_lib
from jaxsd.trackers import BACKENDS

SAMPLES = "_samples"  # row key train_one_step returns them under; the loop pops it
NUM_SAMPLES = 4  # completions logged per evaluation
_TEXT_CHARS = 2000  # longer texts are cut in samples.jsonl (a log, not a dataset)


def backends(cfg: Any) -> tuple[str, ...]:
    """`log.backends` ("jsonl,tensorboard,wandb") as a validated tuple; jsonl is always on."""
    log = cfg.get("log")
    raw = "jsonl,tensorboard" if log is None else log.backends
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"log.backends={raw!r}: unknown {unknown}; choose from {BACKENDS}")
    return names


def param_count(state: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts of a TrainState (frozen = LoRA base weights)."""
    size = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa: E731
    trainable = size(state.params)
    return trainable, trainable + size(state.frozen)


def banner(run: Any, *, config_source: str | None, start_step: int) -> str:
    """Lines printed when training starts: where, what, on which devices, fresh or resumed."""
    cfg = run.cfg
    trainable, total = param_count(run.learner.state)
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    resumed = f"resumed from step {start_step}" if start_step else "fresh start"
    return "\n".join(
        [
            f"[jaxsd] config: {config_source or '(in-process config)'}  "
            f"method {cfg.algorithm.name}, preset {cfg.get('preset', '?')}, seed {cfg.seed}",
            f"[jaxsd] run folder: {cfg.run_dir} ({resumed}, {cfg.total_steps} steps)",
            f"[jaxsd] model: {run.model_dir}  parameters {total:,} (trainable {trainable:,})",
            f"[jaxsd] devices: {len(devices)} x {', '.join(kinds)} ({jax.process_count()} "
            f"process(es)), mesh {dict(run.learner.mesh.shape)}",
        ]
    )


def memory_metrics() -> dict[str, float]:
    """Device memory of the first local device (bytes in use, peak) and the host's peak RSS.

    CPU backends report no device statistics; the host RSS is then the memory the run uses.
    """
    out: dict[str, float] = {}
    stats = jax.local_devices()[0].memory_stats() or {}
    names = {"bytes_in_use": "mem/device_bytes", "peak_bytes_in_use": "mem/device_peak_bytes"}
    for key, name in names.items():
        if key in stats:
            out[name] = float(stats[key])
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    out["mem/host_peak_bytes"] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)
    return out


def _text(messages: Any) -> str | None:
    """The last message of a chat (the question / the teacher's reprompt), cut to a log size."""
    if messages is None:
        return None
    text = messages[-1]["content"] if isinstance(messages, list) else str(messages)
    return text[:_TEXT_CHARS]


def sample_rows(groups: Sequence, plans: Sequence, k: int = NUM_SAMPLES) -> list[dict[str, Any]]:
    """The first rollout of each of the first `k` groups: prompt, response, reward, feedback and
    the teacher context its plan built (None when the teacher saw no extra context)."""
    rollouts = algorithms.flat_rollouts(groups)
    first: dict[str, int] = {}
    for i, r in enumerate(rollouts):
        first.setdefault(r.question_id, i)
    rows = []
    for i in list(first.values())[:k]:
        r, plan = rollouts[i], plans[i]
        rows.append(
            {
                "question_id": r.question_id,
                "prompt": _text(r.prompt),
                "response": r.response[:_TEXT_CHARS],
                "reward": float(r.reward),
                "feedback": r.feedback,
                "teacher_context": _text(plan.teacher_messages),
            }
        )
    return rows


def group_metrics(groups: Sequence, plans: Sequence, threshold: float, n: int) -> dict[str, Any]:
    """Pass-rate statistics and histogram, mean reward and logged samples of one step."""
    pass_rates = [float(np.mean(g.rewards >= threshold)) for g in groups]
    stats: dict[str, Any] = metrics_lib.pass_rate_stats(pass_rates)
    stats[metrics_lib.REWARD] = float(np.mean([r for g in groups for r in g.rewards]))
    stats[metrics_lib.PASS_RATE_HIST] = metrics_lib.pass_rate_histogram(pass_rates, n)
    stats[SAMPLES] = sample_rows(groups, plans)
    return stats
