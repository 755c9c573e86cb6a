"""Typed settings of a run: every config key the run reads, validated, as frozen dataclasses.

`run_settings(cfg)` is cheap (no model, no compile); `jaxsd.train.build.build` uses nothing
else of the config, so a key that does not change `run_settings` changes nothing
(tests/test_config_keys.py walks every key).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from jaxsd import algorithms
from jaxsd.models.lora import LoraConfig
from jaxsd.rollout.placement import Placement, placement_from_config
from jaxsd.tasks import Task, get_task
from jaxsd.tasks.custom import task_from_config
from jaxsd.train import observe
from jaxsd.train.step import StepConfig
from jaxsd.train.validate import lora_targets, mesh_rules, mesh_shape, validate_config


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """`model.*`: which weights, in which numerics, trained how."""

    path: str
    tiny: tuple[tuple[str, Any], ...]  # make_tiny_model kwargs when path == ""
    param_dtype: str
    compute_dtype: str
    remat: bool
    attention: str
    lora: LoraConfig | None


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    """How chats become token ids: lengths and the chat template's thinking switch."""

    max_prompt_len: int
    max_reprompt_len: int
    enable_thinking: bool | None  # None: the template's default (not passed)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """`task.*`: the training task, its data and the evaluation sets."""

    task_name: str
    task_kwargs: tuple[tuple[str, Any], ...]
    module: str  # `task.module`: imported first (it may register tasks)
    reward: str  # `task.reward`: a file: task's verifier
    data_dir: str | None
    questions_per_step: int
    shuffle: bool
    overlong_prompts: str  # "filter" | "error"
    eval_sets: tuple[tuple[str, str], ...]  # (task name, split); () = the task's test split

    def task(self) -> Task:
        """The training task (`jaxsd.tasks.custom.task_from_config` on these settings)."""
        return task_from_config(
            {
                "name": self.task_name,
                "kwargs": dict(self.task_kwargs),
                "module": self.module,
                "reward": self.reward,
            }
        )


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """Training rollouts: G samples per question and how they are drawn."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    async_steps: int  # 1: step N+1's rollouts are sampled while step N trains


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Held-out evaluation (METHODS §9): k samples per question and their sampling."""

    n: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    questions: int  # per evaluation set; 0 = all


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """`optim.*` plus the step count the schedule spans."""

    lr: float
    schedule: str
    warmup_steps: int
    total_steps: int
    weight_decay: float
    b1: float
    b2: float
    eps: float
    grad_clip: float


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Which rollout engine, and what vLLM workers need besides the model folder."""

    kind: str
    max_model_len: int
    run_dir: str
    weights_dir: str  # `rollout.weights_dir`: "auto" | "run" | a folder
    log_dir: str
    seed: int
    dtype: str  # the workers' dtype ("auto" resolved to model.compute_dtype)
    tensor_parallel_size: int
    placement: Placement | None  # GPU sets and memory shares; None without a vllm section
    slots: int  # embedded engine: continuous-batching decode rows (0 = all rows at once)
    timeout_s: float  # worker engine: request bound (0 = automatic)
    restart_on_failure: bool  # worker engine: restart a stalled/crashed worker once
    kv_cache_dtype: str  # embedded engine: "" = the compute dtype
    max_staleness: int  # weights steps a rollout may lag the trainer (rollout.async_steps)


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """Steps, evaluation/checkpoint cadence, run folder, resume, PACED's offline pass, where
    metrics go."""

    total_steps: int
    seed: int
    run_dir: str
    resume: bool
    eval_every: int
    checkpoint_every: int
    keep_checkpoints: int
    paced_offline_n: int | None
    log_backends: tuple[str, ...]  # `log.backends`, validated
    log_project: str  # W&B project / MLflow experiment
    profile_teacher_forward: bool  # time the teacher's forward alone each step (extra pass)
    resume_step: int | None  # continue from this checkpoint (newer ones set aside)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Everything a config decides, as built objects; `build_run` uses nothing else."""

    algorithm: Any
    step: StepConfig
    optim: OptimSettings
    mesh: tuple[int, int, int]  # (data, fsdp, tensor), -1 resolved when devices are known
    rules: tuple  # `mesh.rules`: logical axis -> mesh axes (jaxsd.models.sharding)
    model: ModelSettings
    prompts: PromptSettings
    data: DataSettings
    rollout: RolloutSettings
    evaluation: EvalSettings
    engine: EngineSettings
    loop: LoopSettings


def parse_eval_sets(spec: str) -> tuple[tuple[str, str], ...]:
    """`task.eval_sets` "aime:2024,hmmt:test" -> (("aime", "2024"), ("hmmt", "test"))."""
    sets = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        name, sep, split = item.partition(":")
        if not sep or not name or not split:
            raise ValueError(
                f"config task.eval_sets={spec!r}: {item!r} is not 'task:split' (e.g. "
                "'aime:2024,aime:2025,hmmt:test'; '' = the training task's test split)"
            )
        sets.append((name, split))
    return tuple(sets)


def model_settings(cfg: Any) -> ModelSettings:
    """`model.*` of a config (also what `jaxsd.export` rebuilds a run's model from)."""
    return ModelSettings(
        path=cfg.model.path,
        tiny=tuple(sorted(dict(cfg.model.tiny).items())),
        param_dtype=cfg.model.param_dtype,
        compute_dtype=cfg.model.compute_dtype,
        remat=cfg.model.get("remat", False),
        attention=cfg.model.get("attention", "jaxsd"),
        lora=lora_config(cfg),
    )


def _engine_settings(cfg: Any) -> EngineSettings:
    vllm = cfg.rollout.get("vllm")
    dtype = "auto" if vllm is None else vllm.dtype
    return EngineSettings(
        kind=cfg.rollout.engine,
        max_model_len=_max_len(cfg),
        run_dir=str(cfg.run_dir),
        weights_dir=cfg.rollout.get("weights_dir", "run"),
        log_dir=str(pathlib.Path(cfg.run_dir) / "logs"),
        seed=cfg.seed,
        dtype=cfg.model.compute_dtype if dtype == "auto" else dtype,
        tensor_parallel_size=1 if vllm is None else vllm.tensor_parallel_size,
        placement=None if vllm is None else placement_from_config(cfg),
        slots=cfg.rollout.get("slots", 0),
        timeout_s=cfg.rollout.get("timeout_s", 0.0),
        restart_on_failure=cfg.rollout.get("restart_on_failure", False),
        kv_cache_dtype=cfg.rollout.get("kv_cache_dtype", ""),
        max_staleness=cfg.rollout.get("async_steps", 0),
    )


def run_settings(cfg: Any, num_devices: int | None = None) -> RunSettings:
    """Validate `cfg` and read every key the run uses; builds no model and compiles nothing."""
    validate_config(cfg, num_devices=num_devices)
    algorithm = algorithms.from_config(cfg.algorithm)
    task_kwargs = tuple(sorted(dict(cfg.task.kwargs).items()))
    task_from_config(cfg.task)  # a bad task name, kwargs, reward or module fails before loading
    eval_sets = parse_eval_sets(cfg.task.get("eval_sets", ""))
    for name, _ in eval_sets:
        get_task(name)
    shape = mesh_shape(cfg, num_devices)
    run_dir = str(cfg.run_dir)
    return RunSettings(
        algorithm=algorithm,
        step=step_config(cfg, algorithm.step_switches()),
        optim=OptimSettings(
            lr=cfg.optim.lr,
            schedule=cfg.optim.schedule,
            warmup_steps=cfg.optim.warmup_steps,
            total_steps=cfg.total_steps,
            weight_decay=cfg.optim.weight_decay,
            b1=cfg.optim.b1,
            b2=cfg.optim.b2,
            eps=cfg.optim.eps,
            grad_clip=cfg.optim.grad_clip,
        ),
        mesh=(shape["data"], shape["fsdp"], shape["tensor"]),
        rules=mesh_rules(cfg),
        model=model_settings(cfg),
        prompts=PromptSettings(
            max_prompt_len=cfg.task.max_prompt_len,
            max_reprompt_len=cfg.task.max_reprompt_len,
            enable_thinking=cfg.model.get("enable_thinking"),
        ),
        data=DataSettings(
            task_name=cfg.task.name,
            task_kwargs=task_kwargs,
            module=cfg.task.get("module", ""),
            reward=cfg.task.get("reward", ""),
            data_dir=cfg.task.data_dir or None,
            questions_per_step=cfg.task.questions_per_step,
            shuffle=cfg.task.shuffle,
            overlong_prompts=cfg.task.get("overlong_prompts", "filter"),
            eval_sets=eval_sets,
        ),
        rollout=RolloutSettings(
            n=cfg.rollout.n,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens,
            async_steps=cfg.rollout.get("async_steps", 0),
        ),
        evaluation=EvalSettings(
            n=cfg.rollout.eval_n,
            temperature=cfg.rollout.eval_temperature,
            top_p=cfg.rollout.eval_top_p,
            top_k=cfg.rollout.get("eval_top_k", 0),
            min_p=cfg.rollout.get("eval_min_p", 0.0),
            questions=cfg.rollout.eval_questions,
        ),
        engine=_engine_settings(cfg),
        loop=LoopSettings(
            total_steps=cfg.total_steps,
            seed=cfg.seed,
            run_dir=run_dir,
            resume=cfg.resume,
            eval_every=cfg.eval_every,
            checkpoint_every=cfg.checkpoint_every,
            keep_checkpoints=cfg.keep_checkpoints,
            paced_offline_n=cfg.get("paced_offline_n"),
            log_backends=observe.backends(cfg),
            log_project=cfg.log.project if cfg.get("log") else "jaxsd",
            profile_teacher_forward=bool(cfg.get("profile_teacher_forward", False)),
            resume_step=cfg.get("resume_step"),
        ),
    )


def step_config(cfg: Any, switches: dict[str, Any]) -> StepConfig:
    """Static switches of the train step: the algorithm's terms + the config's loss keys."""
    loss = cfg.loss
    switches = dict(switches)
    rhythm = switches.pop("rhythm", None)
    return StepConfig(
        top_k=loss.top_k,
        alpha=loss.alpha,
        add_tail=loss.add_tail,
        is_clip=loss.is_clip,
        rollout_is=loss.get("rollout_is", False),
        rollout_is_threshold=loss.get("rollout_is_threshold", 2.0),
        policy_loss=loss.get("policy_loss", "ppo"),
        loss_agg_mode=loss.loss_agg_mode,
        loss_agg_norm=loss.get("loss_agg_norm"),
        chunk_size=loss.chunk_size,
        topk_block=loss.get("topk_block"),
        kl_coef=loss.kl_coef,
        kl_kind=loss.kl_estimator,
        entropy_coef=loss.entropy_coef,
        ema_rate=loss.teacher_ema,
        clip_low=loss.clip_low,
        clip_high=loss.clip_high,
        dual_clip=loss.dual_clip,
        rhythm=tuple(sorted(rhythm.items())) if rhythm else (),
        micro_batches=cfg.optim.get("micro_batches", 1),
        **switches,
    )


def lora_config(cfg: Any) -> LoraConfig | None:
    """`model.lora` as a LoraConfig; None (full fine-tuning) for rank 0 or no section."""
    lora = cfg.model.get("lora")
    if lora is None or lora.rank == 0:
        return None
    return LoraConfig(rank=lora.rank, alpha=float(lora.alpha), targets=lora_targets(lora.targets))


def _max_len(cfg: Any) -> int:
    return cfg.task.max_reprompt_len + cfg.rollout.max_new_tokens + cfg.task.max_prompt_len
