"""Test-time self-distillation (SDPO paper, test-time section): one hard question at a time,
rounds of k samples -> verify -> SDPO update on that question alone (feedback-conditioned EMA
self-teacher), until the first success or a generation budget.

Compared with best-of-k sampling of the unchanged model at the same number of generations:
- `discovery@k` (test-time SDPO) = fraction of questions whose first success came within k
  generations;
- best-of-k of the base model = the unbiased pass@k estimate, 1 - C(n-c, k) / C(n, k), from n
  fresh base samples per question (c of them correct).
Questions may be selected as those the base model fails at best-of-`budget` (`select =
"base_failures"`); the selection uses its own samples, and the base curve is measured on fresh
ones, so it is not zero by construction.

Reuses the training loop's pieces: `build`, the rollout worker's `collect` (sample + verify)
and `loop.learn_on_groups` (plan + train step + update weights); the weights are reset between
questions.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsd.train import loop, run_config
from jaxsd.train.build import Run, build

_SELECT_PURPOSE, _BASE_PURPOSE, _ROUND_PURPOSE = 3, 4, 1000
SELECTIONS = ("all", "base_failures")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c,k)/C(n,k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c={c} <= n={n} and 1 <= k={k} <= n")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def discovery_curve(first_success: Sequence[int | None], budget: int) -> list[float]:
    """discovery@k for k = 1..budget: fraction of questions solved within k generations."""
    firsts = np.array([f if f is not None else budget + 1 for f in first_success])
    return [float(np.mean(firsts <= k)) for k in range(1, budget + 1)]


def first_success(rewards: Sequence[float], threshold: float) -> int | None:
    """1-based index of the first reward >= threshold, None if there is none."""
    hits = np.flatnonzero(np.asarray(rewards) >= threshold)
    return int(hits[0]) + 1 if hits.size else None


def _records(run: Run, tt: Any) -> list[dict]:
    """The questions: a JSON-lines file of task records, ids of a split, or a split's head."""
    if tt.questions_file:
        path = pathlib.Path(tt.questions_file)
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for i, row in enumerate(rows):
            for key in ("id", "prompt", "answer"):
                if key not in row:
                    raise ValueError(f"test_time.questions_file {path} record {i}: no {key!r}")
            row.setdefault("system", None)
        return rows
    data_dir, task = run.cfg.task.data_dir or None, run.data.task
    records = [r for split in tt.split.split(",") for r in task.load(split.strip(), data_dir)]
    if tt.ids:
        wanted = [i.strip() for i in tt.ids.split(",") if i.strip()]
        by_id = {str(r["id"]): r for r in records}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise ValueError(f"test_time.ids: {missing} not in split(s) {tt.split!r}")
        return [by_id[i] for i in wanted]
    return records[: tt.num_questions or len(records)]


def _base_rewards(run: Run, records: list[dict], n: int, purpose: int) -> np.ndarray:
    """[Q, n] rewards of the unchanged model (weights step 0), in chunks of questions."""
    per_call = max(1, run.cfg.test_time.base_questions_per_call)
    groups = run.worker.collect_all(records, per_call, n, purpose)
    out = [np.asarray(g.rewards, np.float64) for g in groups]
    return np.stack(out)


def _solve(run: Run, record: dict, q: int, initial: Any, threshold: float) -> dict:
    """Rounds of k samples and SDPO updates on one question, from the initial weights."""
    tt = run.cfg.test_time
    run.learner.state = jax.tree.map(jnp.copy, initial)
    run.host_state = run.algorithm.init_state(run.cfg.seed)
    run.worker.update_weights(run.learner.state, 0)
    rounds = tt.budget // tt.k
    losses = []
    for r in range(rounds):
        groups, _ = run.worker.collect([record], r, n=tt.k, purpose=_ROUND_PURPOSE + q)
        hit = first_success(groups[0].rewards, threshold)
        if hit is not None:
            return {"first_success": r * tt.k + hit, "rounds": r + 1, "losses": losses}
        if r + 1 < rounds:  # no update after the last round: nothing would sample from it
            stats = loop.learn_on_groups(run, groups, r, epoch=0)
            losses.append(float(stats.get("loss", float("nan"))) if stats else float("nan"))
    return {"first_success": None, "rounds": rounds, "losses": losses}


def run_test_time(cfg: Any) -> dict[str, Any]:
    """Run test-time SDPO per `cfg.test_time`; writes test_time.json and test_time.png."""
    tt = cfg.test_time
    if tt.k < 1 or tt.budget < tt.k or tt.budget % tt.k:
        raise ValueError(f"test_time.budget={tt.budget} must be a positive multiple of "
                         f"test_time.k={tt.k}")  # fmt: skip
    if tt.select not in SELECTIONS:
        raise ValueError(f"test_time.select={tt.select!r}; use one of {SELECTIONS}")
    if cfg.task.questions_per_step != 1 or cfg.rollout.n != tt.k:
        raise ValueError(
            f"test_time needs task.questions_per_step=1 and rollout.n=test_time.k={tt.k} "
            f"(got {cfg.task.questions_per_step}, {cfg.rollout.n}): one question per update"
        )
    t0 = time.perf_counter()
    cfg = run_config.resolve_run_dir(cfg)  # `{hash}` in run_dir -> the config's hash
    run = build(cfg)
    threshold = run.algorithm.success_threshold
    try:
        initial = jax.tree.map(jnp.copy, run.learner.state)
        run.worker.update_weights(run.learner.state, 0)
        records = _records(run, tt)
        candidates = len(records)
        if tt.select == "base_failures":
            chosen = _base_rewards(run, records, tt.budget, _SELECT_PURPOSE)
            records = [r for r, row in zip(records, chosen, strict=True) if row.max() < threshold]
        if not records:
            raise ValueError(
                f"no question left to run: the base model solved all {candidates} within "
                f"best-of-{tt.budget} (test_time.select={tt.select!r}); pick harder questions"
            )
        base = _base_rewards(run, records, tt.budget, _BASE_PURPOSE)
        per_question = []
        for q, record in enumerate(records):
            result = _solve(run, record, q, initial, threshold)
            c = int(np.sum(base[q] >= threshold))
            base_first = first_success(base[q], threshold)
            per_question.append(
                {
                    "id": str(record["id"]),
                    **result,
                    "base_correct": c,
                    "base_first_success": base_first,
                }
            )
            print(f"[jaxsd] test-time {q + 1}/{len(records)} {record['id']}: first success "
                  f"{result['first_success']}, base {c}/{tt.budget}", flush=True)  # fmt: skip
    finally:
        run.close()
    summary = summarize(per_question, tt.budget, tt.k)
    summary.update(candidates=candidates, select=tt.select, wall_s=time.perf_counter() - t0,
                   run_dir=str(cfg.run_dir))  # fmt: skip
    out = pathlib.Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "test_time.json").write_text(json.dumps(summary, indent=1))
    summary["plot"] = plot_discovery(summary, out / "test_time.png")
    return summary


def summarize(per_question: list[dict], budget: int, k: int) -> dict[str, Any]:
    """Curves and headline numbers from the per-question results."""
    sdpo = discovery_curve([p["first_success"] for p in per_question], budget)
    base = [
        float(np.mean([pass_at_k(budget, p["base_correct"], j) for p in per_question]))
        for j in range(1, budget + 1)
    ]
    solved = [p for p in per_question if p["first_success"] is not None]
    return {
        "questions": len(per_question),
        "budget": budget,
        "k": k,
        "solved_by_test_time_sdpo": len(solved),
        "fraction_solved_by_test_time_sdpo": len(solved) / max(len(per_question), 1),
        "base_best_of_budget_fresh": base[-1],
        "discovery_at_k": {"test_time_sdpo": sdpo, "base_best_of_k": base},
        "per_question": per_question,
    }


def plot_discovery(summary: dict[str, Any], path: pathlib.Path) -> str:
    """discovery@k of test-time SDPO vs best-of-k of the base model, one PNG."""
    from jaxsd.plots import plt

    ks = np.arange(1, summary["budget"] + 1)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    curves = summary["discovery_at_k"]
    ax.plot(ks, curves["test_time_sdpo"], label=f"test-time SDPO (k={summary['k']} per round)")
    ax.plot(ks, curves["base_best_of_k"], label="best-of-k, unchanged model", linestyle="--")
    ax.set_xlabel("generations")
    ax.set_ylabel("discovery@k")
    ax.set_ylim(0, 1)
    ax.set_title(f"{summary['questions']} questions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
