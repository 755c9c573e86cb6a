"""Several rollout workers behind one engine: one vLLM worker per tensor-parallel GPU group.

`generate` splits the prompts into contiguous, near-equal shares, sends every share at once
(each worker generates while the others do) and joins the results in prompt order;
`load_weights` makes every worker serve the step, side by side. Samples of one prompt always
come from one worker, so a group's G rollouts share their weights step.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from jaxsd.rollout.engine import RolloutResult, RolloutWorkerError, SamplingConfig


class SubmittingEngine(Protocol):
    """What the pool needs of each worker: `VllmEngine`'s submit / load_weights / close."""

    weights_step: int

    def submit(self, prompt_token_ids: Sequence[Sequence[int]], n: int,
               sampling: SamplingConfig, *, timeout_s: float | None = None) -> Any: ...  # fmt: skip

    def load_weights(self, step: int) -> int: ...

    def restart(self) -> None: ...

    def close(self) -> None: ...


def split_evenly(num_items: int, num_parts: int) -> list[range]:
    """Contiguous ranges covering 0..num_items, sizes differing by at most one; none empty."""
    parts = min(num_parts, num_items)
    base, extra = divmod(num_items, parts)
    bounds = np.cumsum([0] + [base + (i < extra) for i in range(parts)])
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def join_results(results: Sequence[RolloutResult], shares: Sequence[range]) -> RolloutResult:
    """Concatenate per-worker results; prompt indices go back to the caller's numbering."""
    steps = {r.weights_step for r in results}
    if len(steps) != 1:
        raise RolloutWorkerError(
            f"rollout workers answered with different weights steps {sorted(steps)}; every "
            "worker must serve the same step - load_weights() them all first"
        )
    joined: dict[str, list] = {"token_ids": [], "logprobs": [], "finish_reasons": [],
                               "prompt_index": []}  # fmt: skip
    for result, share in zip(results, shares, strict=True):
        joined["token_ids"] += list(result.token_ids)
        joined["logprobs"] += list(result.logprobs)
        joined["finish_reasons"] += list(result.finish_reasons)
        joined["prompt_index"] += [share.start + i for i in result.prompt_index]
    return RolloutResult(**joined, weights_step=steps.pop())


class WorkerPool:
    """A RolloutEngine over several workers (see module docstring)."""

    def __init__(self, workers: Sequence[SubmittingEngine]):
        if not workers:
            raise ValueError("WorkerPool needs at least one worker")
        self.workers = list(workers)

    @property
    def weights_step(self) -> int:
        return min(w.weights_step for w in self.workers)

    @property
    def follow_latest(self) -> bool:
        return all(w.follow_latest for w in self.workers)

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        n: int,
        sampling: SamplingConfig,
        *,
        timeout_s: float | None = None,
    ) -> RolloutResult:
        shares = split_evenly(len(prompt_token_ids), len(self.workers))
        pending = [
            worker.submit([prompt_token_ids[i] for i in share], n, sampling, timeout_s=timeout_s)
            for worker, share in zip(self.workers, shares, strict=False)
        ]
        return join_results([p.result() for p in pending], shares)

    def load_weights(self, step: int) -> int:
        with concurrent.futures.ThreadPoolExecutor(len(self.workers)) as pool:
            served = list(pool.map(lambda w: w.load_weights(step), self.workers))
        return min(served)

    def restart(self) -> None:
        """Restart every worker (after one stalled or crashed; the others hold stale requests)."""
        for worker in self.workers:
            worker.restart()

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
