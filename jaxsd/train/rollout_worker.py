"""The rollout worker: engine + tokenizer + task -> verified groups (and held-out scores).

One interface whichever engine serves: `update_weights(state, step)` hands the trainer's
weights to the embedded JAX engine (a device copy) or publishes them for the vLLM workers
(an Orbax step in the weights folder, then waits for the workers to load it); `collect`
samples and verifies; `evaluate` scores the evaluation sets with the same engine.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxsd import algorithms
from jaxsd.eval import eval_metrics_for_log, evaluate
from jaxsd.models import ModelConfig, to_hf_state_dict
from jaxsd.models.io import plain_model
from jaxsd.models.lora import LoraConfig, merge_lora
from jaxsd.rollout.engine import RolloutResult, SamplingConfig, check_weights_step
from jaxsd.tasks import Task
from jaxsd.tasks.base import verify_all
from jaxsd.tasks.reprompt import chat_token_ids
from jaxsd.train import data
from jaxsd.train.batch import LENGTH_BUCKETS
from jaxsd.train.settings import EngineSettings, EvalSettings, PromptSettings, RolloutSettings

EVAL_PURPOSE = 1  # data.sampling_seed purposes: 0 = training rollouts
# The automatic rollout timeout: a multiple of the slowest rollout so far, with a floor (the
# first request after start or a weights load may pay for compilation or a cold cache).
ROLLOUT_TIMEOUT_MULTIPLE, ROLLOUT_TIMEOUT_FLOOR_S = 5.0, 120.0


@dataclasses.dataclass(frozen=True)
class ChatPrompts:
    """Chats -> token ids with the run's chat template, lengths and thinking switch."""

    tokenizer: Any
    settings: PromptSettings

    def student(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """A student prompt (`task.max_prompt_len`)."""
        return self._ids(messages, self.settings.max_prompt_len)

    def teacher(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """A teacher reprompt (`task.max_reprompt_len`)."""
        return self._ids(messages, self.settings.max_reprompt_len)

    def length(self, messages: Sequence[dict[str, str]]) -> int:
        """Tokens of the chat prompt, uncut (to drop prompts over the budget)."""
        return len(self._ids(messages, sys.maxsize))

    def _ids(self, messages: Sequence[dict[str, str]], max_len: int) -> list[int]:
        return chat_token_ids(
            self.tokenizer, messages, max_len, enable_thinking=self.settings.enable_thinking
        )


def rollout_timeout_s(configured: float, slowest_s: float) -> float | None:
    """`rollout.timeout_s` when set; else 5x the slowest rollout, at least 120 s; None (the
    worker's own start-up-sized default) before any rollout was measured."""
    if configured > 0:
        return float(configured)
    if slowest_s <= 0:
        return None
    return max(ROLLOUT_TIMEOUT_FLOOR_S, ROLLOUT_TIMEOUT_MULTIPLE * slowest_s)


def engine_params_fn(graphdef: nnx.GraphDef, lora: LoraConfig | None) -> Callable:
    """TrainState -> the weights the rollout engine serves (a plain model's nnx.Param state).

    With LoRA the trained params are only the adapters; the engine gets W + (alpha / r) A B,
    merged in one jitted call so that nothing runs op by op on the host.
    """
    if lora is None:
        return lambda state: state.params

    @jax.jit
    def merged(params: nnx.State, frozen: nnx.State) -> nnx.State:
        return nnx.state(merge_lora(nnx.merge(graphdef, params, frozen)), nnx.Param)

    return lambda state: merged(state.params, state.frozen)


def _local(x: jax.Array) -> jax.Array:
    """The whole value of a global array on this host (multi-host: gathered from all)."""
    if x.is_fully_addressable:
        return x
    return jnp.asarray(multihost_utils.process_allgather(x, tiled=True))


def _single_device_copy(params: nnx.State, state: Any) -> nnx.State:
    """`params` on this host's first device, in buffers of their own: the state is donated to
    the next step, and the embedded sampler is the single-device engine."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # Only the state's own buffers need the copy (a LoRA merge already made new ones).
    copy = jnp.copy if params is state.params else (lambda x: x)
    return jax.tree.map(lambda x: jax.device_put(copy(_local(x)), device), params)


def engine_model(kind: str, config: ModelConfig, engine_params: Callable, state: Any) -> Any:
    """The rollout engine's model, taken from the trainer's state (no second checkpoint read).

    The embedded engine (`kind` "jax") gets a single-device copy of `engine_params(state)`;
    vLLM workers load the checkpoint themselves, so theirs is shapes only, filled by
    `PublishedWeights.publish`. Either way a plain model with our attention and no remat.
    """
    config = dataclasses.replace(config, attention="jaxsd", remat=False)
    if kind != "jax":
        return plain_model(config)
    return plain_model(config, _single_device_copy(engine_params(state), state))


class EmbeddedWeights:
    """Weights for the in-process JAX engine: a single-device copy of the trainer's params."""

    def __init__(self, engine: Any, engine_params: Callable, max_staleness: int = 0):
        self.engine, self.engine_params = engine, engine_params
        self.max_staleness = max_staleness

    def snapshot(self, state: Any, step: int) -> nnx.State:
        """The weights to serve, in buffers of their own (the next train step donates
        `state`'s)."""
        return _single_device_copy(self.engine_params(state), state)

    def serve(self, snapshot: nnx.State, step: int) -> dict[str, float]:
        self.engine.set_params(snapshot, step)
        return {}

    def staleness(self, result: RolloutResult, step: int) -> int:
        return check_weights_step(result, trainer_step=step, max_staleness=self.max_staleness)

    def close(self) -> None:
        pass


class PublishedWeights:
    """Weights for vLLM workers: an HF-named Orbax step in the weights folder (`WeightSync`)."""

    def __init__(self, model: nnx.Module, sync: Any, engine_params: Callable):
        self.model, self.sync, self.engine_params = model, sync, engine_params

    def snapshot(self, state: Any, step: int) -> dict[str, np.ndarray] | None:
        """HF-named host copies of the weights to serve; None for a step not published
        (`publish_every`)."""
        if not self.sync.should_publish(step):
            return None
        nnx.update(self.model, self.engine_params(state))
        return to_hf_state_dict(self.model, self.model.config)

    def serve(self, snapshot: dict[str, np.ndarray] | None, step: int) -> dict[str, float]:
        """Save the snapshot as weights step `step`, then (as the sync decides) wait for the
        workers to load it."""
        timing = self.sync.after_step(step, lambda: snapshot)
        return {f"time/publish_{k}": v for k, v in (timing or {}).items()}

    def staleness(self, result: RolloutResult, step: int) -> int:
        return self.sync.check(result, step)

    def close(self) -> None:
        self.sync.close()


@dataclasses.dataclass
class RolloutWorker:
    """Samples and verifies rollouts for the trainer; owns the engine and its weights."""

    engine: Any
    weights: EmbeddedWeights | PublishedWeights
    prompts: ChatPrompts
    task: Task
    stop_ids: tuple[int, ...]
    rollout: RolloutSettings
    engine_settings: EngineSettings
    seed: int
    slowest_rollout_s: float = 0.0  # sets the automatic rollout timeout
    restarts: int = 0
    served_step: int | None = None  # the optimizer step whose weights the engine has
    _background: ThreadPoolExecutor | None = None  # sampling ahead (rollout.async_steps)

    @property
    def in_process(self) -> bool:
        """The embedded engine runs here: nothing to time out or restart."""
        return isinstance(self.weights, EmbeddedWeights)

    def update_weights(self, state: Any, step: int) -> dict[str, float]:
        """Serve the params of optimizer step `step` from now on; returns publish timings
        (none when that step is served already)."""
        if step == self.served_step:
            return {}
        t0 = time.perf_counter()
        return self._serve(self.weights.snapshot(state, step), step, t0)

    def _serve(self, snapshot: Any, step: int, t0: float) -> dict[str, float]:
        stats = self.weights.serve(snapshot, step)
        self.served_step = step
        return {**stats, "time/publish_s": time.perf_counter() - t0}

    def collect(
        self, records: Sequence[dict], step: int, *, n: int | None = None, purpose: int = 0
    ) -> tuple[list[algorithms.Group], dict[str, float]]:
        """n (default G) rollouts per question with the current weights, verified and grouped."""
        n = self.rollout.n if n is None else n
        prompt_ids = [self.prompts.student(self.task.messages(r)) for r in records]
        sampling = self._sampling(seed=data.sampling_seed(self.seed, step, purpose=purpose))
        t0 = time.perf_counter()
        result = self.generate(prompt_ids, n, sampling)
        rollout_s = time.perf_counter() - t0
        staleness = self.weights.staleness(result, step)
        t_verify = time.perf_counter()
        rollouts = self._verified(result, records)
        generated = sum(len(t) for t in result.token_ids)
        truncated = [f == "length" for f in result.finish_reasons]
        stats = {
            "time/rollout_s": rollout_s,
            "time/verify_s": time.perf_counter() - t_verify,  # detokenise + task.verify
            "perf/rollout_tokens_per_s": generated / max(rollout_s, 1e-9),
            "rollout/staleness": float(staleness),
            "rollout/response_len": generated / len(rollouts),
            "rollout/frac_truncated": float(np.mean(truncated)),
        }
        return algorithms.group_rollouts(rollouts), stats

    def submit(self, records: Sequence[dict], step: int, state: Any) -> Future:
        """Serve `state`'s weights (optimizer step `step` - 1), then `collect(records, step)`,
        in the background (rollout.async_steps): the engine is brought up to date and samples
        while the caller trains on `state`. `.result()` gives the groups and their metrics.

        Only the weights' copy is taken here, before `state` is donated to the next train step;
        saving and loading them overlap the train step too (one process: a multi-host save
        synchronises the processes, so there it stays in front).
        """
        if self._background is None:
            self._background = ThreadPoolExecutor(1, thread_name_prefix="jaxsd-rollout")
        weights_step, t0 = step - 1, time.perf_counter()
        if weights_step == self.served_step or jax.process_count() > 1:
            published = self.update_weights(state, weights_step)
            return self._background.submit(self._collect_with, published, list(records), step)
        snapshot, records = self.weights.snapshot(state, weights_step), list(records)

        def serve_then_collect() -> tuple[list[algorithms.Group], dict[str, float]]:
            return self._collect_with(self._serve(snapshot, weights_step, t0), records, step)

        return self._background.submit(serve_then_collect)

    def _collect_with(self, stats: dict, records: Sequence[dict], step: int) -> tuple[list, dict]:
        groups, collected = self.collect(records, step)
        return groups, {**stats, **collected}

    def collect_all(
        self, records: Sequence[dict], per_call: int, n: int | None, purpose: int
    ) -> list[algorithms.Group]:
        """Every record rolled out (n each) and verified, `per_call` questions at a time."""
        groups = []
        for start in range(0, len(records), per_call):
            chunk, _ = self.collect(records[start : start + per_call], 0, n=n, purpose=purpose)
            groups.extend(chunk)
        return groups

    def _sampling(self, *, seed: int, **eval_overrides: Any) -> SamplingConfig:
        r = self.rollout
        kwargs = {"temperature": r.temperature, "top_p": r.top_p, **eval_overrides}
        return SamplingConfig(
            max_new_tokens=r.max_new_tokens, stop_token_ids=self.stop_ids, seed=seed, **kwargs
        )

    def _verified(self, result: RolloutResult, records: Sequence[dict]) -> list[algorithms.Rollout]:
        tokenizer = self.prompts.tokenizer
        texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in result.token_ids]
        verdicts = verify_all(self.task, texts, [records[q] for q in result.prompt_index])
        rollouts = []
        for tokens, logp, q, text, verdict in zip(
            result.token_ids, result.logprobs, result.prompt_index, texts, verdicts, strict=True
        ):
            record = records[q]
            rollouts.append(
                algorithms.Rollout(
                    question_id=str(record["id"]),
                    prompt=self.task.messages(record),
                    response=text,
                    response_ids=[int(t) for t in tokens],
                    logprobs=np.asarray(logp, np.float32),
                    reward=float(verdict.reward),
                    feedback=verdict.feedback,
                    # -mean log p(sampled token) is an unbiased estimate of the mean token
                    # entropy; engines return sampled-token log-probs, not full distributions.
                    entropy=float(-np.mean(logp)) if len(logp) else 0.0,
                )
            )
        return rollouts

    def generate(self, prompt_ids: list, n: int, sampling: SamplingConfig) -> RolloutResult:
        """`engine.generate`, bounded in time for worker engines; with
        `rollout.restart_on_failure`, a stalled or crashed worker is restarted once and the
        request sent again (the restarted worker reloads the weights it served)."""
        if self.in_process:
            return self.engine.generate(prompt_ids, n, sampling)
        from jaxsd.rollout.engine import RolloutTimeoutError, WorkerCrashedError

        timeout = rollout_timeout_s(self.engine_settings.timeout_s, self.slowest_rollout_s)
        t0 = time.perf_counter()
        try:
            result = self.engine.generate(prompt_ids, n, sampling, timeout_s=timeout)
        except (RolloutTimeoutError, WorkerCrashedError) as err:
            if not self.engine_settings.restart_on_failure or self.restarts:
                raise
            self.restarts += 1
            print(f"[jaxsd] {str(err).splitlines()[0]}\n[jaxsd] restarting the rollout worker "
                  "once (rollout.restart_on_failure)", flush=True)  # fmt: skip
            self._restart_engine()
            t0 = time.perf_counter()
            result = self.engine.generate(prompt_ids, n, sampling, timeout_s=timeout)
        self.slowest_rollout_s = max(self.slowest_rollout_s, time.perf_counter() - t0)
        return result

    def _restart_engine(self) -> None:
        """Start a fresh worker and bring it back to the weights step the old one served."""
        served = self.engine.weights_step
        self.engine.restart()
        if self.engine.weights_step != served:
            self.engine.load_weights(served)

    def evaluate(
        self, eval_sets: Sequence[tuple[str, Task, list[dict]]], ev: EvalSettings
    ) -> dict[str, float]:
        """mean@k / maj@k / best@k on each set with the current weights (METHODS §9);
        `eval/<metric>` averages the sets (SSOPD's macro Avg@12 over AIME 24/25 and HMMT 25)."""
        reports = {}
        for name, task, records in eval_sets:
            report = evaluate(
                self._generate_texts,
                task,
                records[: ev.questions or len(records)],
                n=ev.n,
                temperature=ev.temperature,
                top_p=ev.top_p,
                top_k=ev.top_k,
                min_p=ev.min_p,
                seed=data.sampling_seed(self.seed, 0, purpose=EVAL_PURPOSE),
            )
            reports[name] = report["report"]
        return eval_metrics_for_log(reports)

    def _generate_texts(self, prompts, *, n, temperature, top_p, top_k, min_p, seed):
        """`jaxsd.eval.evaluate`'s generate_fn: chats -> n completion texts each."""
        ids = [self.prompts.student(m) for m in prompts]
        sampling = self._sampling(
            seed=seed, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p
        )
        result = self.generate(ids, n, sampling)
        texts = self.prompts.tokenizer.batch_decode(
            [t.tolist() for t in result.token_ids], skip_special_tokens=True
        )
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]

    def close(self) -> None:
        """Stop the engine, then drop the published weights (RAM scratch folder)."""
        if self._background is not None:
            self._background.shutdown(wait=True, cancel_futures=True)
        self.engine.close()
        self.weights.close()


def start_engine(
    settings: EngineSettings, model: nnx.Module, model_dir: pathlib.Path, engine_params: Callable
) -> tuple[Any, EmbeddedWeights | PublishedWeights]:
    """The engine `rollout.engine` names and how it receives weights."""
    if settings.kind == "jax":
        from jaxsd.rollout.jax_engine import JaxEngine

        engine = JaxEngine(
            model,
            weights_step=0,
            length_buckets=LENGTH_BUCKETS,
            slots=settings.slots or None,
            kv_dtype=settings.kv_cache_dtype or None,
        )
        return engine, EmbeddedWeights(engine, engine_params, settings.max_staleness)
    engine, sync = _start_vllm_workers(settings, model, model_dir)
    return engine, PublishedWeights(model, sync, engine_params)


def _start_vllm_workers(settings: EngineSettings, model: nnx.Module, model_dir: pathlib.Path):
    from jaxsd.rollout.sync import SyncConfig, WeightSync
    from jaxsd.rollout.vllm_engine import VllmEngine, VllmWorkerConfig
    from jaxsd.rollout.weights import resolve_weights_dir
    from jaxsd.rollout.worker_pool import WorkerPool

    placement = settings.placement
    keep = SyncConfig.keep
    weights_dir, in_ram = resolve_weights_dir(
        settings.weights_dir,
        pathlib.Path(settings.run_dir).resolve(),  # Orbax needs absolute paths
        bytes_per_step=_param_bytes(model),
        keep=keep,
        num_processes=jax.process_count(),
    )
    print(f"weights steps publish to {weights_dir}" + (" (RAM)" if in_ram else ""), flush=True)
    sync_config = SyncConfig(
        weights_dir=weights_dir, keep=keep, scratch=in_ram, max_staleness=settings.max_staleness
    )
    workers = [
        VllmEngine(
            VllmWorkerConfig(
                model_dir=str(model_dir),
                weights_dir=str(weights_dir),
                name=f"rollout-{i}",
                seed=settings.seed + i,
                max_model_len=settings.max_model_len,
                log_dir=settings.log_dir,
                dtype=settings.dtype,
                tensor_parallel_size=settings.tensor_parallel_size,
                gpu_memory_utilization=placement.gpu_memory_utilization,
                sleep_between_rollouts=placement.sleep_between_rollouts,
                env=placement.worker_env(i),
            )
        )
        for i in range(placement.num_workers)
    ]
    engine = workers[0] if len(workers) == 1 else WorkerPool(workers)
    return engine, WeightSync(engine, sync_config)


def _param_bytes(model: nnx.Module) -> int:
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
