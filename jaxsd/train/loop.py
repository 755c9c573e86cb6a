"""The training loop (DESIGN "data flow of one step") over the parts `build(cfg)` makes:

    worker.collect (engine -> verify) -> algorithm.plan -> learner.learn (jitted step)
      -> worker.update_weights -> periodic worker.evaluate -> checkpoint

Everything a restart needs is in the checkpoint: the learner's train state (params, teacher,
optimizer, step, RNG) and the algorithm's host state; the data position is the step itself
(`jaxsd.train.data`).
"""

from __future__ import annotations

import functools
import pathlib
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import jax

from jaxsd import metrics as metrics_lib
from jaxsd.train import observe, run_config
from jaxsd.train.build import Run, build
from jaxsd.train.checkpoint import Checkpointer
from jaxsd.train.interrupt import GracefulStop, close_all, close_on_error, maybe_inject_crash
from jaxsd.train.report import finish_summary, print_interrupted
from jaxsd.train.run_lock import lock_run_dir
from jaxsd.train.validate import validate_config

OFFLINE_PURPOSE = 2  # data.sampling_seed purpose of the algorithm's pass before training
_SWITCHES = ("use_distillation", "use_surrogate", "use_ssopd", "use_rhythm", "teacher_mode")


def train_one_step(run: Run, step: int) -> dict[str, Any]:
    """Rollout -> verify -> plan -> train step -> update weights, for 0-based step `step`.

    With `rollout.async_steps=1` this step's rollouts were sampled while the previous step
    trained (`run.ahead`), and the engine receives this step's starting weights and samples
    the next step's rollouts with them while this one trains.
    """
    t_start = time.perf_counter()
    records, epoch = run.data.for_step(step, run.settings)
    groups, stats = run.ahead if run.ahead is not None else run.worker.collect(records, step)
    run.ahead, ahead = None, None
    if run.settings.rollout.async_steps and step + 1 < run.settings.loop.total_steps:
        upcoming, _ = run.data.for_step(step + 1, run.settings)
        ahead = run.worker.submit(upcoming, step + 1, run.learner.state)
    maybe_inject_crash(step)
    stats.update(learn_on_groups(run, groups, step, epoch, sampling_ahead=ahead))
    stats["time/step_s"] = time.perf_counter() - t_start
    return stats


def learn_on_groups(
    run: Run, groups: Sequence, step: int, epoch: int, *, sampling_ahead: Future | None = None
) -> dict[str, Any]:
    """Plan -> train step -> update weights: optimizer step `step` + 1 on verified groups.

    `sampling_ahead` (the next step's rollouts, in flight) is awaited; the new weights then
    go to the engine with the next step's `submit` (or before an evaluation), else here.
    Test-time self-distillation (jaxsd.test_time) calls this on its groups.
    """
    plans, run.host_state, algo_metrics = run.algorithm.plan(groups, run.host_state, epoch=epoch)
    learned = run.learner.learn(groups, plans, step)
    if sampling_ahead is None:
        stats = run.worker.update_weights(run.learner.state, step + 1)
    else:
        t_wait = time.perf_counter()
        run.ahead = sampling_ahead.result()
        stats = {"time/rollout_wait_s": time.perf_counter() - t_wait}
    threshold = run.algorithm.success_threshold
    stats.update(observe.group_metrics(groups, plans, threshold, run.settings.rollout.n))
    return stats | {f"algo/{k}": v for k, v in algo_metrics.items()} | learned | {"epoch": epoch}


def start_or_resume(run: Run, checkpointer: Checkpointer) -> int:
    """The step to start from: a restored checkpoint (with `resume`), else 0 after the
    algorithm's preparation. The worker serves that step's weights afterwards.

    With `resume_step=N`, steps newer than N are moved to `<run_dir>/superseded_checkpoints/`
    (kept, not deleted) so that the run can save them anew.
    """
    loop = run.settings.loop
    if checkpointer.will_resume(loop.resume, loop.resume_step):
        step, host = run.learner.restore(checkpointer, loop.resume_step)
        run.restore_host_state(host)
        if loop.resume_step is not None:
            checkpointer.set_aside_after(loop.resume_step)
        run.worker.update_weights(run.learner.state, step)
        print(f"[jaxsd] resumed from {checkpointer.directory}/{step}", flush=True)
        return step
    run.worker.update_weights(run.learner.state, 0)
    q, n = run.settings.data.questions_per_step, run.settings.loop.paced_offline_n
    sample_all = functools.partial(
        run.worker.collect_all, run.data.train_records, q, n, OFFLINE_PURPOSE
    )
    run.host_state = run.algorithm.before_training(run.host_state, sample_all)
    return 0


def train(cfg: Any, *, config_source: str | None = None) -> dict[str, Any]:
    """Train per `cfg`; returns a summary (start/end eval, wall time, paths).

    `run_dir` is resolved (`{hash}`), locked for this run's lifetime (a second run on it
    refuses at once) and checked against the folder's `config.json`; Ctrl-C stops after the
    step in progress with a checkpoint (summary["interrupted"]).
    """
    validate_config(cfg, num_devices=jax.device_count())
    cfg = run_config.resolve_run_dir(cfg)
    lock = lock_run_dir(cfg.run_dir) if jax.process_index() == 0 else None
    try:
        t0 = time.perf_counter()
        cfg = run_config.prepare_run_dir(cfg, is_main_process=jax.process_index() == 0)
        observe.backends(cfg)  # a typo fails here, before anything loads
        summary = _train(build(cfg), config_source)
        summary["wall_s"] = time.perf_counter() - t0
        return summary
    finally:
        if lock is not None:
            lock.release()


def _train(run: Run, config_source: str | None) -> dict[str, Any]:
    loop, is_main = run.settings.loop, jax.process_index() == 0
    run_dir = pathlib.Path(loop.run_dir)
    checkpointer = Checkpointer(run_dir, max_to_keep=loop.keep_checkpoints)
    try:
        start = start_or_resume(run, checkpointer)
    except BaseException:
        close_on_error(checkpointer, run)
        raise
    if is_main:
        print(observe.banner(run, config_source=config_source, start_step=start), flush=True)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "start_step": start, **run.data.stats}
    summary["step_switches"] = {k: getattr(run.settings.step, k) for k in _SWITCHES}
    stop = GracefulStop()
    done, failed = start, True
    try:
        stop.install()
        done = _steps(run, checkpointer, start, stop, summary)
        checkpointer.wait()
        failed = False
    finally:
        stop.restore()
        (close_on_error if failed else close_all)(checkpointer, run)
    if stop.requested:
        summary["interrupted"] = True
        print_interrupted(done, checkpointer.directory if done > start else None)
    if is_main and done > 0:
        finish_summary(summary, run_dir)
    summary["end_step"] = done
    return summary


def _steps(run: Run, checkpointer: Checkpointer, start: int, stop: GracefulStop, summary: dict):
    """Steps `start` .. total_steps (or until Ctrl-C); returns the last step done."""
    loop, is_main = run.settings.loop, jax.process_index() == 0
    if start == 0 and is_main:  # a run that died before its first checkpoint starts over
        metrics_lib.discard_metrics(loop.run_dir)
    writer = metrics_lib.MetricsWriter(
        pathlib.Path(loop.run_dir), is_main_process=is_main, resume_step=start or None,
        backends=loop.log_backends, config=run_config.config_dict(run.cfg),
        project=loop.log_project,
    )  # fmt: skip
    progress = metrics_lib.Progress(loop.total_steps, initial_step=start, is_main_process=is_main)
    done = start
    try:
        if start == 0:
            first = dict(run.data.stats)
            if loop.eval_every:
                summary["eval_start"] = run.evaluate()
                first.update(summary["eval_start"])
            writer.write(0, first)
        for step in range(start, loop.total_steps):
            if stop.requested:  # nothing new since the last checkpoint (or the start)
                break
            row = train_one_step(run, step)
            done = step + 1
            samples = row.pop(observe.SAMPLES)
            if loop.eval_every and (done % loop.eval_every == 0 or done == loop.total_steps):
                t_eval = time.perf_counter()
                run.worker.update_weights(run.learner.state, done)  # behind when sampling ahead
                row.update(run.evaluate())
                row["time/eval_s"] = time.perf_counter() - t_eval
                summary["eval_end"] = {k: v for k, v in row.items() if k.startswith("eval/")}
                writer.write_samples(done, samples)
            hist = {metrics_lib.PASS_RATE_HIST: row.pop(metrics_lib.PASS_RATE_HIST)}
            row.update(observe.memory_metrics())
            writer.write(done, row, histograms=hist)
            progress.update(done, row)
            summary.setdefault("losses", []).append(row["loss"])  # every process: same values
            if (loop.checkpoint_every and done % loop.checkpoint_every == 0) or (
                done == loop.total_steps or stop.requested
            ):
                checkpointer.save(done, run.learner.state, run.host_state_json(done))
    finally:
        progress.close()
        writer.close()
    return done
