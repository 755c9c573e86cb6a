"""The training loop (DESIGN "data flow of one step").

    rollout (engine) -> verify (task) -> plan (algorithm, host) -> train step (jit)
      -> publish weights -> periodic eval -> checkpoint

`run_settings(cfg)` reads every config key into typed settings (cheap: no model, no
compile); `build_run(cfg)` turns those settings into the parts; `train(cfg)` drives them and
returns a summary. The loop reads the config only through the settings, so a key that does not
change `run_settings` changes nothing (tests/test_config_keys.py walks every key).

Everything a restart needs is in the checkpoint: the train state (params, teacher,
optimizer, step, RNG) and the host state (the algorithm's state; the data position is the
step itself, see `jaxsd.train.data`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxsd import algorithms
from jaxsd import metrics as metrics_lib
from jaxsd.eval import eval_metrics_for_log, evaluate, stop_token_ids
from jaxsd.models import from_pretrained, to_hf_state_dict
from jaxsd.models.lora import LoraConfig, merge_lora, trainable_filter
from jaxsd.rollout.engine import SamplingConfig
from jaxsd.rollout.placement import Placement, placement_from_config
from jaxsd.tasks import Task, get_task
from jaxsd.tasks.base import verify_all
from jaxsd.tasks.custom import task_from_config
from jaxsd.tasks.reprompt import chat_token_ids
from jaxsd.train import data, observe, run_config
from jaxsd.train.batch import (
    TrainSample,
    batch_shardings,
    build_batch,
    global_batch,
    process_rows,
)
from jaxsd.train.checkpoint import Checkpointer
from jaxsd.train.interrupt import GracefulStop
from jaxsd.train.mesh import make_mesh
from jaxsd.train.optimizer import make_optimizer, make_schedule
from jaxsd.train.run_lock import lock_run_dir
from jaxsd.train.state import train_state_from_model
from jaxsd.train.step import STATE_FINITE_PREFIX, StepConfig, make_teacher_forward, make_train_step
from jaxsd.train.validate import (
    check_prompt_lengths,
    lora_targets,
    mesh_shape,
    validate_config,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
LENGTH_BUCKETS = tuple(2**i for i in range(4, 16))  # 16 ... 32768 tokens
_EVAL_PURPOSE, _OFFLINE_PURPOSE = 1, 2
_SWITCHES = ("use_distillation", "use_surrogate", "use_ssopd", "use_rhythm", "teacher_mode")


# ----------------------------------------------------------------------------- settings


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


@dataclasses.dataclass
class Run:
    """Everything built from a config; `train` mutates `state` and `host_state`."""

    cfg: Any
    settings: RunSettings
    model_dir: pathlib.Path
    tokenizer: Any
    model: nnx.Module  # the rollout engine's copy of the policy (JAX engine)
    task: Any
    train_records: list[dict]
    test_records: list[dict]
    eval_sets: list[tuple[str, Task, list[dict]]]  # (report name, task, records)
    algorithm: Any
    step_cfg: StepConfig
    mesh: jax.sharding.Mesh
    graphdef: Any
    state: Any
    state_shardings: Any
    batch_shardings: Any
    train_step: Any
    engine: Any
    sync: Any  # WeightSync for the vLLM engine, None for the embedded one
    engine_params: Any  # TrainState -> the engine model's nnx.Param state (LoRA merged in)
    stop_ids: list[int]
    vocab_size: int  # the model's; build_batch rejects token ids outside it
    host_state: Any = None
    start_step: int = 0
    data_stats: dict[str, float] = dataclasses.field(default_factory=dict)  # data/* metrics
    teacher_forward: Any = None  # jitted lone teacher forward (profile_teacher_forward), or None
    slowest_rollout_s: float = 0.0  # sets the automatic rollout timeout (rollout_timeout_s)
    worker_restarts: int = 0


# ----------------------------------------------------------------------------- building


def resolve_model_dir(model: ModelSettings, run_dir: str) -> pathlib.Path:
    """A local HF folder for `model.path`: made on the fly (""), a path, or a hub download."""
    if model.path == "":
        folder = pathlib.Path(run_dir) / "tiny_model"
        if not (folder / "config.json").is_file():
            from jaxsd.models.tiny import make_tiny_model

            make_tiny_model(folder, **dict(model.tiny))
        return folder
    for candidate in (pathlib.Path(model.path), REPO_ROOT / model.path):
        if (candidate / "config.json").is_file():
            return candidate
    if pathlib.Path(model.path).exists():
        raise FileNotFoundError(
            f"model.path={model.path!r} has no config.json; pass an HF model folder"
        )
    try:
        from huggingface_hub import snapshot_download

        return pathlib.Path(snapshot_download(model.path))
    except Exception as err:
        raise FileNotFoundError(
            f"model.path={model.path!r} is neither a local HF folder nor downloadable from "
            f"the Hugging Face hub ({type(err).__name__}); download it elsewhere and pass the "
            "local folder"
        ) from err


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


def engine_params_fn(graphdef: nnx.GraphDef, lora: LoraConfig | None) -> Any:
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


def _make_engine(settings: EngineSettings, model: nnx.Module, model_dir: pathlib.Path):
    if settings.kind == "jax":
        from jaxsd.rollout.jax_engine import JaxEngine

        engine = JaxEngine(
            model,
            weights_step=0,
            length_buckets=LENGTH_BUCKETS,
            slots=settings.slots or None,
            kv_dtype=settings.kv_cache_dtype or None,
        )
        return engine, None
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
    sync_config = SyncConfig(weights_dir=weights_dir, keep=keep, scratch=in_ram)
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


def _max_len(cfg: Any) -> int:
    return cfg.task.max_reprompt_len + cfg.rollout.max_new_tokens + cfg.task.max_prompt_len


def template_tokens(tokenizer: Any) -> int:
    """Tokens the chat template adds around an empty user message (with the generation prompt)."""
    return len(chat_token_ids(tokenizer, [{"role": "user", "content": ""}], 1 << 30))


def load_data(data: DataSettings) -> tuple[Task, list[dict], list[dict], list[tuple]]:
    """The training task, its train and test records, and the evaluation sets.

    Runs first in `build_run`: a missing data file fails before any model load or compile.
    """
    task = data.task()
    train_records = task.load("train", data_dir=data.data_dir)
    test_records = task.load("test", data_dir=data.data_dir)
    eval_sets = [(task.name, task, test_records)]
    if data.eval_sets:
        eval_sets = []
        for name, split in data.eval_sets:
            eval_task = get_task(name)
            records = eval_task.load(split, data_dir=data.data_dir)
            eval_sets.append((f"{eval_task.name}_{split}", eval_task, records))
    return task, train_records, test_records, eval_sets


def build_run(cfg: Any) -> Run:
    """Validate the config and build model, task, algorithm, mesh, state, step and engine."""
    settings = run_settings(cfg, num_devices=jax.device_count())
    # The data first: a missing file fails before any model load or compile.
    task, train_records, test_records, eval_sets = load_data(settings.data)
    model_dir = resolve_model_dir(settings.model, settings.loop.run_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Prompt budgets and the task's data are checked before the model loads (minutes for an 8B).
    check_prompt_lengths(cfg, template_tokens(tokenizer))
    train_records, train_stats = _fitting_prompts(settings, tokenizer, task, train_records, "train")
    test_records, test_stats = _fitting_prompts(settings, tokenizer, task, test_records, "test")
    if not settings.data.eval_sets:
        eval_sets = [(task.name, task, test_records)]
    dtype = jnp.dtype(settings.model.param_dtype)
    compute_dtype = jnp.dtype(settings.model.compute_dtype)
    model, model_config = from_pretrained(model_dir, dtype=dtype, compute_dtype=compute_dtype)
    validate_config(cfg, vocab_size=model_config.vocab_size, num_devices=jax.device_count())

    algorithm = settings.algorithm
    step_cfg = settings.step
    optim = settings.optim
    schedule = make_schedule(
        optim.lr,
        warmup_steps=optim.warmup_steps,
        kind=optim.schedule,
        total_steps=optim.total_steps,
    )
    tx = make_optimizer(
        schedule,
        weight_decay=optim.weight_decay,
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        clip_norm=optim.grad_clip,
    )
    mesh = make_mesh(settings.mesh)
    # The trainer owns its own copy of the weights; `model` stays the engine's copy.
    lora = settings.model.lora
    seed = settings.loop.seed
    train_model, _ = from_pretrained(
        model_dir,
        dtype=dtype,
        compute_dtype=compute_dtype,
        lora=lora,
        seed=seed,
        attention=settings.model.attention,
        remat=settings.model.remat,
    )
    graphdef, state, shardings = train_state_from_model(
        train_model,
        tx,
        mesh=mesh,
        seed=seed,
        teacher_mode=step_cfg.teacher_mode,
        trainable=trainable_filter(lora),
    )
    b_shardings = batch_shardings(mesh)
    train_step = make_train_step(
        graphdef,
        tx,
        step_cfg,
        state_shardings=shardings,
        batch_shardings=b_shardings,
        schedule=schedule,
    )
    engine, sync = _make_engine(settings.engine, model, model_dir)
    return Run(
        cfg=cfg,
        settings=settings,
        model_dir=model_dir,
        tokenizer=tokenizer,
        model=model,
        task=task,
        train_records=train_records,
        test_records=test_records,
        eval_sets=eval_sets,
        algorithm=algorithm,
        step_cfg=step_cfg,
        mesh=mesh,
        graphdef=graphdef,
        state=state,
        state_shardings=shardings,
        batch_shardings=b_shardings,
        train_step=train_step,
        engine=engine,
        sync=sync,
        engine_params=engine_params_fn(graphdef, lora),
        stop_ids=stop_token_ids(model_dir, tokenizer),
        vocab_size=model_config.vocab_size,
        host_state=algorithm.init_state(seed),
        data_stats={**train_stats, **test_stats},
        teacher_forward=(
            make_teacher_forward(graphdef)
            if settings.loop.profile_teacher_forward and step_cfg.needs_teacher
            else None
        ),
    )


def _fitting_prompts(
    settings: RunSettings, tokenizer: Any, task: Any, records: list[dict], split: str
) -> tuple[list[dict], dict[str, float]]:
    """The split's records whose chat prompt fits task.max_prompt_len (data.drop_overlong)."""
    if not records:
        raise ValueError(
            f"task {settings.data.task_name!r} has no {split} records (task.kwargs, "
            "task.data_dir); training needs at least one question per split"
        )
    prompts = settings.prompts
    lengths = [
        len(
            chat_token_ids(
                tokenizer, task.messages(r), sys.maxsize, enable_thinking=prompts.enable_thinking
            )
        )
        for r in records
    ]
    return data.drop_overlong(
        records,
        lengths,
        max_len=prompts.max_prompt_len,
        mode=settings.data.overlong_prompts,
        what=split,
    )


# ----------------------------------------------------------------------------- one step


def prompt_token_ids(run: Run, messages: Sequence[dict[str, str]], *, teacher: bool = False):
    """Chat token ids of a student prompt (or, `teacher`, a teacher reprompt) of this run."""
    prompts = run.settings.prompts
    return chat_token_ids(
        run.tokenizer,
        messages,
        prompts.max_reprompt_len if teacher else prompts.max_prompt_len,
        enable_thinking=prompts.enable_thinking,
    )


def collect_groups(
    run: Run, records: Sequence[dict], step: int, *, n: int | None = None, purpose: int = 0
) -> tuple[list, dict[str, float]]:
    """Sample n (default G) rollouts per question with the current weights and verify them."""
    rollout = run.settings.rollout
    n = rollout.n if n is None else n
    prompt_ids = [prompt_token_ids(run, run.task.messages(r)) for r in records]
    sampling = SamplingConfig(
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        max_new_tokens=rollout.max_new_tokens,
        stop_token_ids=tuple(run.stop_ids),
        seed=data.sampling_seed(run.settings.loop.seed, step, purpose=purpose),
    )
    t0 = time.perf_counter()
    result = generate_rollouts(run, prompt_ids, n, sampling)
    rollout_s = time.perf_counter() - t0
    staleness = run.sync.check(result, step) if run.sync is not None else 0
    if run.sync is None and result.weights_step != step:
        raise RuntimeError(
            f"embedded engine served weights step {result.weights_step} at trainer step {step}"
        )
    t_verify = time.perf_counter()
    texts = [run.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in result.token_ids]
    verdicts = verify_all(run.task, texts, [records[q] for q in result.prompt_index])
    rollouts = []
    for tokens, logp, q, text, verdict in zip(
        result.token_ids, result.logprobs, result.prompt_index, texts, verdicts, strict=True
    ):
        record = records[q]
        rollouts.append(
            algorithms.Rollout(
                question_id=str(record["id"]),
                prompt=run.task.messages(record),
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
    groups = algorithms.group_rollouts(rollouts)
    generated = sum(len(t) for t in result.token_ids)
    stats = {
        "time/rollout_s": rollout_s,
        "time/verify_s": time.perf_counter() - t_verify,  # detokenise + task.verify
        "perf/rollout_tokens_per_s": generated / max(rollout_s, 1e-9),
        "rollout/staleness": float(staleness),
        "rollout/response_len": generated / len(rollouts),
        "rollout/frac_truncated": float(np.mean([f == "length" for f in result.finish_reasons])),
    }
    return groups, stats


# The automatic rollout timeout: a multiple of the slowest rollout so far, with a floor (the
# first request after start or a weights load may pay for compilation or a cold cache).
ROLLOUT_TIMEOUT_MULTIPLE, ROLLOUT_TIMEOUT_FLOOR_S = 5.0, 120.0


def rollout_timeout_s(configured: float, slowest_s: float) -> float | None:
    """`rollout.timeout_s` when set; else 5x the slowest rollout, at least 120 s; None (the
    worker's own start-up-sized default) before any rollout was measured."""
    if configured > 0:
        return float(configured)
    if slowest_s <= 0:
        return None
    return max(ROLLOUT_TIMEOUT_FLOOR_S, ROLLOUT_TIMEOUT_MULTIPLE * slowest_s)


def generate_rollouts(run: Run, prompt_ids: list, n: int, sampling: SamplingConfig) -> Any:
    """`engine.generate` bounded in time for the worker engine; with
    `rollout.restart_on_failure`, a stalled or crashed worker is restarted once and the request
    sent again (the restarted worker reloads the weights it served)."""
    if run.sync is None:  # the embedded engine runs in this process: nothing to wait for
        return run.engine.generate(prompt_ids, n, sampling)
    from jaxsd.rollout.engine import RolloutTimeoutError, WorkerCrashedError

    timeout = rollout_timeout_s(run.settings.engine.timeout_s, run.slowest_rollout_s)
    t0 = time.perf_counter()
    try:
        result = run.engine.generate(prompt_ids, n, sampling, timeout_s=timeout)
    except (RolloutTimeoutError, WorkerCrashedError) as err:
        if not run.settings.engine.restart_on_failure or run.worker_restarts:
            raise
        run.worker_restarts += 1
        print(f"[jaxsd] {str(err).splitlines()[0]}\n[jaxsd] restarting the rollout worker "
              "once (rollout.restart_on_failure)", flush=True)  # fmt: skip
        _restart_worker(run.engine)
        t0 = time.perf_counter()
        result = run.engine.generate(prompt_ids, n, sampling, timeout_s=timeout)
    run.slowest_rollout_s = max(run.slowest_rollout_s, time.perf_counter() - t0)
    return result


def _restart_worker(engine: Any) -> None:
    """Start a fresh worker and bring it back to the weights step the old one served."""
    served = engine.weights_step
    engine.restart()
    if engine.weights_step != served:
        engine.load_weights(served)


def plans_to_samples(run: Run, groups: Sequence, plans: Sequence) -> list[TrainSample]:
    """Tokenise each plan's teacher chat and attach the per-rollout numbers (batch contract)."""
    samples = []
    rollouts = algorithms.flat_rollouts(groups)
    group_size = {g.question_id: len(g) for g in groups}
    prompt_cache: dict[str, list[int]] = {}
    for rollout, plan in zip(rollouts, plans, strict=True):
        if rollout.question_id not in prompt_cache:
            prompt_cache[rollout.question_id] = prompt_token_ids(run, rollout.prompt)
        teacher_ids = None
        if plan.teacher_messages is not None:
            teacher_ids = prompt_token_ids(run, plan.teacher_messages, teacher=True)
        samples.append(
            TrainSample(
                prompt_ids=prompt_cache[rollout.question_id],
                response_ids=list(rollout.response_ids),
                old_logp=np.asarray(rollout.logprobs, np.float32),
                teacher_prompt_ids=teacher_ids,
                advantage=plan.advantage,
                pg_weight=plan.pg_weight,
                sd_weight=plan.sd_weight,
                ssopd_weight=plan.ssopd_weight,
                ssopd_len=plan.ssopd_len,
                rhythm_beta=plan.rhythm_beta,
                group_size=group_size[rollout.question_id],
            )
        )
    return samples


def _group_stats(groups: Sequence, threshold: float) -> dict[str, Any]:
    pass_rates = [float(np.mean(g.rewards >= threshold)) for g in groups]
    stats: dict[str, Any] = metrics_lib.pass_rate_stats(pass_rates)
    stats[metrics_lib.REWARD] = float(np.mean([r for g in groups for r in g.rewards]))
    return stats, pass_rates


def _publish(run: Run, step: int) -> dict[str, float]:
    """Hand the params after optimizer step `step` to the rollout engine."""
    if run.sync is None:
        # The state is donated to the next step, so the engine gets its own copy, gathered onto
        # one device: the embedded sampler is the single-device engine.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        params = run.engine_params(run.state)
        # Only the state's own buffers need the copy (a LoRA merge already made new ones).
        copy = jnp.copy if params is run.state.params else (lambda x: x)
        params = jax.tree.map(lambda x: jax.device_put(copy(_local(x)), device), params)
        run.engine.set_params(params, step)
        return {}
    nnx.update(run.model, run.engine_params(run.state))
    timing = run.sync.after_step(step, lambda: to_hf_state_dict(run.model, run.model.config))
    return {f"time/publish_{k}": v for k, v in (timing or {}).items()}


def _local(x: jax.Array) -> jax.Array:
    """The whole value of a global array on this host (multi-host: gathered from all)."""
    if x.is_fully_addressable:
        return x
    return jnp.asarray(multihost_utils.process_allgather(x, tiled=True))


def _questions(run: Run, step: int) -> tuple[Sequence[int], int]:
    return data.questions_for_step(
        step,
        questions_per_step=run.settings.data.questions_per_step,
        num_records=len(run.train_records),
        seed=run.settings.loop.seed,
        shuffle=run.settings.data.shuffle,
    )


def train_one_step(run: Run, step: int) -> dict[str, Any]:
    """Rollout -> verify -> plan -> train step -> publish, for 0-based step `step`."""
    t_start = time.perf_counter()
    indices, epoch = _questions(run, step)
    records = [run.train_records[i] for i in indices]
    groups, stats = collect_groups(run, records, step)
    _maybe_inject_crash(step)
    stats.update(update_on_groups(run, groups, step, epoch))
    stats["time/step_s"] = time.perf_counter() - t_start
    return stats


def update_on_groups(run: Run, groups: Sequence, step: int, epoch: int) -> dict[str, Any]:
    """Plan -> train step -> publish on verified groups: optimizer step `step` + 1.

    The second half of `train_one_step`; test-time self-distillation (jaxsd.test_time) calls it
    on the groups of its one question.
    """
    plans, run.host_state, algo_metrics = run.algorithm.plan(groups, run.host_state, epoch=epoch)
    samples, lengths = process_rows(plans_to_samples(run, groups, plans))
    local = build_batch(
        samples, pad_id=_pad_id(run), length_buckets=LENGTH_BUCKETS, vocab_size=run.vocab_size,
        lengths=lengths,
    )  # fmt: skip
    batch = global_batch(local, run.batch_shardings)
    stats: dict[str, Any] = {}
    if run.teacher_forward is not None:
        stats["time/teacher_forward_s"] = _time_teacher_forward(run, batch)
    t_train = time.perf_counter()
    run.state, step_metrics = run.train_step(run.state, batch)
    reduced = metrics_lib.reduce_metric_pairs(jax.device_get(step_metrics))
    train_s = time.perf_counter() - t_train
    state_flags = _pop_state_flags(reduced)
    _check_finite(step + 1, reduced)
    _check_state_finite(step + 1, state_flags, reduced)
    t_publish = time.perf_counter()
    stats.update(_publish(run, step + 1))
    stats["time/publish_s"] = time.perf_counter() - t_publish
    group_stats, pass_rates = _group_stats(groups, getattr(run.algorithm, "success_threshold", 0.5))
    response_tokens = int(np.sum(local.response_mask))
    stats.update(group_stats)
    stats.update({f"algo/{k}": v for k, v in algo_metrics.items()})
    stats.update(reduced)
    stats.update(
        {
            "epoch": epoch,
            "time/train_s": train_s,
            metrics_lib.TOKENS_PER_S: response_tokens / max(train_s, 1e-9),
            "perf/batch_shape": list(local.student_tokens.shape) + [local.response_tokens.shape[1]],
        }
    )
    stats[metrics_lib.PASS_RATE_HIST] = metrics_lib.pass_rate_histogram(
        pass_rates, run.settings.rollout.n
    )
    stats[observe.SAMPLES] = observe.sample_rows(groups, plans)
    return stats


def _time_teacher_forward(run: Run, batch: Any) -> float:
    """Seconds of the teacher's forward alone on this step's batch (an extra pass; the train
    step's own copy of it is fused and cannot be timed apart)."""
    state = run.state
    teacher = state.params if state.teacher is None else state.teacher
    t0 = time.perf_counter()
    jax.block_until_ready(run.teacher_forward(teacher, state.frozen, batch))
    return time.perf_counter() - t0


def _maybe_inject_crash(step: int) -> None:
    """Crash tests: JAXSD_FAULT_KILL_AT_STEP=n SIGKILLs this process in the middle of step n
    (1-based), after its rollouts and before its update, as a node failure would."""
    kill_at = os.environ.get("JAXSD_FAULT_KILL_AT_STEP")
    if kill_at is not None and int(kill_at) == step + 1:
        os.kill(os.getpid(), signal.SIGKILL)


def _pad_id(run: Run) -> int:
    pad = run.tokenizer.pad_token_id
    return int(pad if pad is not None else run.stop_ids[0])


def _check_finite(step: int, reduced: dict[str, float]) -> None:
    bad = {k: v for k, v in reduced.items() if not math.isfinite(v)}
    if bad:
        finite = {k: v for k, v in reduced.items() if math.isfinite(v)}
        raise FloatingPointError(
            f"non-finite metrics at step {step}: {bad}; finite ones: {finite}. Nothing of "
            f"step {step} was published or saved: the last checkpoint holds the last good "
            "state. Lower optim.lr or check the data, then rerun with --config.resume=True "
            "(or --config.resume_step=N for an earlier checkpoint)."
        )


def _pop_state_flags(reduced: dict[str, float]) -> dict[str, float]:
    """Take the step's `state_finite/<part>` flags out of the metrics (they are not logged)."""
    keys = [k for k in reduced if k.startswith(STATE_FINITE_PREFIX)]
    return {k.removeprefix(STATE_FINITE_PREFIX): reduced.pop(k) for k in keys}


# Which config keys most likely make each part of the new state non-finite.
_LIKELY_KEYS = {
    "opt_state": "optim.eps (> 0), optim.b1 / optim.b2 (in [0, 1))",
    "params": "optim.lr, optim.eps, optim.weight_decay",
    "teacher": "loss.teacher_ema",
}


def _check_state_finite(step: int, flags: dict[str, float], reduced: dict[str, float]) -> None:
    """Stop before a state with NaN/inf params or optimizer moments is published or saved."""
    bad = [part for part, ok in flags.items() if ok != 1.0]
    if bad:
        keys = "; ".join(_LIKELY_KEYS[p] for p in bad)
        raise FloatingPointError(
            f"the update of step {step} made {', '.join(bad)} non-finite although the loss "
            f"({reduced.get('loss')}) and gradients (grad_norm {reduced.get('grad_norm')}) "
            f"were finite; nothing of step {step} was published or saved. Likely keys: {keys}. "
            "Fix them and rerun with --config.resume=True (the last checkpoint is good), or "
            "--config.resume_step=N to go back further."
        )


def offline_pass(run: Run) -> Any:
    """PACED (METHODS §5): pass rates of every training question, estimated once, frozen."""
    from jaxsd.algorithms import paced

    q = run.settings.data.questions_per_step
    groups = []
    for start in range(0, len(run.train_records), q):
        chunk, _ = collect_groups(
            run, run.train_records[start : start + q], 0,
            n=run.settings.loop.paced_offline_n, purpose=_OFFLINE_PURPOSE,
        )  # fmt: skip
        groups.extend(chunk)
    rates = paced.estimate_pass_rates(groups, success_threshold=run.algorithm.success_threshold)
    print(f"[jaxsd] PACED offline pass: {len(rates)} questions, mean pass rate "
          f"{np.mean(list(rates.values())):.3f}", flush=True)  # fmt: skip
    return paced.freeze_pass_rates(run.host_state, rates)


# ----------------------------------------------------------------------------- eval


def evaluate_now(run: Run, step: int) -> dict[str, float]:
    """mean@k / maj@k / best@k on each evaluation set with the engine's current weights (§9);
    `eval/<metric>` averages the sets (SSOPD's macro Avg@12 over AIME 24/25 and HMMT 25)."""
    ev = run.settings.evaluation

    def generate_fn(prompts, *, n, temperature, top_p, top_k, min_p, seed):
        ids = [prompt_token_ids(run, m) for m in prompts]
        sampling = SamplingConfig(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            max_new_tokens=run.settings.rollout.max_new_tokens,
            stop_token_ids=tuple(run.stop_ids),
            seed=seed,
        )
        result = generate_rollouts(run, ids, n, sampling)
        texts = run.tokenizer.batch_decode(
            [t.tolist() for t in result.token_ids], skip_special_tokens=True
        )
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]

    reports = {}
    for name, task, records in run.eval_sets:
        report = evaluate(
            generate_fn,
            task,
            records[: ev.questions or len(records)],
            n=ev.n,
            temperature=ev.temperature,
            top_p=ev.top_p,
            top_k=ev.top_k,
            min_p=ev.min_p,
            seed=data.sampling_seed(run.settings.loop.seed, 0, purpose=_EVAL_PURPOSE),
        )
        reports[name] = report["report"]
    return eval_metrics_for_log(reports)


# ----------------------------------------------------------------------------- the loop


def _abstract(state: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def maybe_resume(run: Run, checkpointer: Checkpointer) -> int:
    """Restore the latest intact checkpoint (or `resume_step`) when `resume` is on.

    Returns the step to start from. With `resume_step=N`, steps newer than N are moved to
    `<run_dir>/superseded_checkpoints/` (kept, not deleted) so that the run can save them anew.
    """
    chosen = run.settings.loop.resume_step
    if not run.settings.loop.resume or checkpointer.latest_step() is None:
        if chosen is not None:
            raise ValueError(
                f"config resume_step={chosen} needs resume=True and a checkpoint in "
                f"{checkpointer.directory}; have {checkpointer.all_steps()}"
            )
        return 0
    abstract = _abstract(run.state)
    state, host, step = checkpointer.restore(chosen, abstract_train_state=abstract)
    if chosen is not None:
        checkpointer.set_aside_after(chosen)
    run.state = state
    run.host_state = algorithms.HostState.from_json(host["algorithm"])
    if host.get("step") != step:
        raise ValueError(f"checkpoint {step} says step {host.get('step')}; it is inconsistent")
    _publish(run, step)
    print(f"[jaxsd] resumed from {checkpointer.directory}/{step}", flush=True)
    return step


def _host_state(run: Run, step: int) -> dict[str, Any]:
    return {
        "algorithm": run.host_state.to_json(),
        "step": step,
        "config": json.loads(run.cfg.to_json()),
    }


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
        return _train(cfg, config_source=config_source)
    finally:
        if lock is not None:
            lock.release()


def _closables(run: Run, checkpointer: Checkpointer) -> list[Any]:
    """What a run closes at its end, in order: checkpoints, the engine, the weights folder."""
    return [checkpointer, run.engine] + ([run.sync] if run.sync is not None else [])


def _close_on_error(*parts: Any) -> None:
    """Close Orbax and the engine while an error propagates, without burying it.

    A checkpointer left open keeps Orbax's threads and event loop alive into interpreter
    shutdown, which then prints pages of "Event loop is closed" after the real error; a
    failure while closing is reported in one line and the original error stays the last
    thing printed.
    """
    for part in parts:
        try:
            part.close()
        except Exception as err:  # the error in flight is the one to report
            print(f"[jaxsd] while stopping after an error, {type(part).__name__}.close() "
                  f"failed too: {type(err).__name__}: {str(err)[:300]}", flush=True)  # fmt: skip


def _train(cfg: Any, *, config_source: str | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    is_main = jax.process_index() == 0
    cfg = run_config.prepare_run_dir(cfg, is_main_process=is_main)
    observe.backends(cfg)  # a typo fails here, before anything loads
    run = build_run(cfg)
    loop = run.settings.loop
    run_dir = pathlib.Path(loop.run_dir)
    checkpointer = Checkpointer(run_dir, max_to_keep=loop.keep_checkpoints)
    try:
        if not loop.resume and checkpointer.latest_step() is not None:
            raise FileExistsError(
                f"run_dir={cfg.run_dir!r} already holds checkpoints and resume=False; pass "
                "--config.resume=True to continue it or pick a new --config.run_dir"
            )
        start = maybe_resume(run, checkpointer)
    except BaseException:
        _close_on_error(*_closables(run, checkpointer))
        raise
    metrics_path = run_dir / metrics_lib.METRICS_FILE
    if start == 0 and is_main and metrics_path.exists():
        # A run that died before its first checkpoint restarts from scratch.
        print(f"[jaxsd] no checkpoint in {run_dir}: starting over, replacing {metrics_path}")
        metrics_path.unlink()
    if start == 0:
        _publish(run, 0)
        if run.algorithm.name == "paced":
            run.host_state = offline_pass(run)
    writer = metrics_lib.MetricsWriter(
        run_dir,
        is_main_process=is_main,
        resume_step=start if start else None,
        backends=loop.log_backends,
        config=run_config.config_dict(cfg),
        project=loop.log_project,
    )
    if is_main:
        print(observe.banner(run, config_source=config_source, start_step=start), flush=True)
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "start_step": start,
        "step_switches": {k: getattr(run.step_cfg, k) for k in _SWITCHES},
    }
    progress = metrics_lib.Progress(loop.total_steps, initial_step=start, is_main_process=is_main)
    done, stop = start, GracefulStop()
    summary.update(run.data_stats)
    failed = True
    try:
        stop.install()
        if start == 0:
            first = dict(run.data_stats)
            if loop.eval_every:
                summary["eval_start"] = evaluate_now(run, 0)
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
                row.update(evaluate_now(run, done))
                row["time/eval_s"] = time.perf_counter() - t_eval
                summary["eval_end"] = {k: v for k, v in row.items() if k.startswith("eval/")}
                writer.write_samples(done, samples)
            hist = {metrics_lib.PASS_RATE_HIST: row.pop(metrics_lib.PASS_RATE_HIST)}
            row.update(observe.memory_metrics())
            writer.write(done, row, histograms=hist)
            progress.update(done, row)
            summary.setdefault("losses", []).append(row["loss"])  # every process: same values
            if (
                (loop.checkpoint_every and done % loop.checkpoint_every == 0)
                or done == loop.total_steps
                or stop.requested
            ):
                checkpointer.save(done, run.state, _host_state(run, done))
        checkpointer.wait()
        failed = False
    finally:
        stop.restore()
        progress.close()
        writer.close()
        parts = _closables(run, checkpointer)
        if failed:
            _close_on_error(*parts)
        else:
            for part in parts:
                part.close()
    if stop.requested:
        summary["interrupted"] = True
        saved = f"saved in {checkpointer.directory}" if done > start else "nothing new to save"
        print(f"[jaxsd] stopped by Ctrl-C at step {done} ({saved}); run the same command again "
              "to continue", flush=True)  # fmt: skip
    if is_main and done > 0:
        from jaxsd.plots import plot_run

        # A resumed run reports start vs end from the whole run's log, not just this process.
        evals = [
            r for r in metrics_lib.read_metrics(run_dir) if any(k.startswith("eval/") for k in r)
        ]
        if evals:
            summary["eval_start"] = {k: v for k, v in evals[0].items() if k.startswith("eval/")}
            summary["eval_end"] = {k: v for k, v in evals[-1].items() if k.startswith("eval/")}

        summary["plot"] = plot_run(run_dir)
    summary["wall_s"] = time.perf_counter() - t0
    summary["end_step"] = done
    return summary
