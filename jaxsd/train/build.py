"""`build(cfg)`: a config -> the parts a run is made of.

    data        the training task's records (prompts over budget dropped) and the eval sets
    worker      rollout worker: engine + tokenizer + task -> verified groups, held-out scores
    algorithm   verified groups -> per-rollout plans, with its host state
    learner     train state, jitted step, checkpoints

The data is read first, so a missing file fails before any model load or compile.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from jaxsd import algorithms
from jaxsd.eval import stop_token_ids
from jaxsd.models import from_pretrained, read_config
from jaxsd.models.lora import trainable_filter
from jaxsd.tasks import Task, get_task
from jaxsd.tasks.reprompt import chat_token_ids
from jaxsd.train import data
from jaxsd.train.batch import batch_shardings
from jaxsd.train.learner import Learner
from jaxsd.train.mesh import make_mesh
from jaxsd.train.optimizer import make_optimizer, make_schedule
from jaxsd.train.rollout_worker import (
    ChatPrompts,
    RolloutWorker,
    engine_model,
    engine_params_fn,
    start_engine,
)
from jaxsd.train.settings import (
    DataSettings,
    ModelSettings,
    OptimSettings,
    RunSettings,
    run_settings,
)
from jaxsd.train.state import train_state_from_model
from jaxsd.train.step import make_teacher_forward, make_train_step
from jaxsd.train.validate import check_prompt_lengths, validate_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class RunData:
    """The questions a run trains and evaluates on."""

    task: Task
    train_records: list[dict]
    test_records: list[dict]
    eval_sets: list[tuple[str, Task, list[dict]]]  # (report name, task, records)
    stats: dict[str, float]  # data/* metrics: prompts kept and dropped per split

    def for_step(self, step: int, settings: RunSettings) -> tuple[list[dict], int]:
        """The training questions of 0-based step `step` and their data epoch."""
        indices, epoch = data.questions_for_step(
            step, questions_per_step=settings.data.questions_per_step,
            num_records=len(self.train_records), seed=settings.loop.seed,
            shuffle=settings.data.shuffle,
        )  # fmt: skip
        return [self.train_records[i] for i in indices], epoch


@dataclasses.dataclass
class Run:
    """Everything built from a config; the loop advances `learner.state` and `host_state`."""

    cfg: Any
    settings: RunSettings
    model_dir: pathlib.Path
    data: RunData
    worker: RolloutWorker
    algorithm: algorithms.Algorithm
    learner: Learner
    host_state: algorithms.HostState
    ahead: tuple[list, dict] | None = None  # async: next step's (groups, metrics), sampled

    def evaluate(self) -> dict[str, float]:
        """Held-out scores of the weights the worker serves now (METHODS §9)."""
        return self.worker.evaluate(self.data.eval_sets, self.settings.evaluation)

    def host_state_json(self, step: int) -> dict[str, Any]:
        """What a checkpoint keeps beside the train state: the algorithm's state, the step, the
        config, and (async) the batch already sampled for the next step."""
        ahead = None
        if self.ahead is not None:
            ahead = {"groups": algorithms.groups_to_json(self.ahead[0]), "stats": self.ahead[1]}
        config = json.loads(self.cfg.to_json())
        return {"algorithm": self.host_state.to_json(), "step": step, "config": config,
                "ahead": ahead}  # fmt: skip

    def restore_host_state(self, host: dict[str, Any]) -> None:
        """Inverse of `host_state_json` (checkpoints without "ahead" are on-policy ones)."""
        # Read as the algorithm's own state type (DRIFT's, PACED's, or the empty HostState).
        self.host_state = self.algorithm.state_type.from_json(host["algorithm"])
        ahead = host.get("ahead")
        if ahead is not None:
            self.ahead = algorithms.groups_from_json(ahead["groups"]), ahead["stats"]

    def close(self) -> None:
        self.worker.close()


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


def load_data(settings: DataSettings) -> tuple[Task, list[dict], list[dict], list[tuple]]:
    """The training task, its train and test records, and the evaluation sets."""
    task = settings.task()
    train_records = task.load("train", data_dir=settings.data_dir)
    test_records = task.load("test", data_dir=settings.data_dir)
    eval_sets = [(task.name, task, test_records)]
    if settings.eval_sets:
        eval_sets = []
        for name, split in settings.eval_sets:
            eval_task = get_task(name)
            records = eval_task.load(split, data_dir=settings.data_dir)
            eval_sets.append((f"{eval_task.name}_{split}", eval_task, records))
    return task, train_records, test_records, eval_sets


def fitting_prompts(
    settings: RunSettings, prompts: ChatPrompts, task: Task, records: list[dict], split: str
) -> tuple[list[dict], dict[str, float]]:
    """The split's records whose chat prompt fits task.max_prompt_len (data.drop_overlong)."""
    if not records:
        raise ValueError(
            f"task {settings.data.task_name!r} has no {split} records (task.kwargs, "
            "task.data_dir); training needs at least one question per split"
        )
    lengths = [prompts.length(task.messages(r)) for r in records]
    return data.drop_overlong(
        records,
        lengths,
        max_len=settings.prompts.max_prompt_len,
        mode=settings.data.overlong_prompts,
        what=split,
    )


def template_tokens(tokenizer: Any) -> int:
    """Tokens the chat template adds around an empty user message (with the generation prompt)."""
    return len(chat_token_ids(tokenizer, [{"role": "user", "content": ""}], 1 << 30))


def _run_data(cfg: Any, settings: RunSettings, prompts: ChatPrompts, loaded: tuple) -> RunData:
    task, train_records, test_records, eval_sets = loaded
    check_prompt_lengths(cfg, template_tokens(prompts.tokenizer))
    train_records, train_stats = fitting_prompts(settings, prompts, task, train_records, "train")
    test_records, test_stats = fitting_prompts(settings, prompts, task, test_records, "test")
    if not settings.data.eval_sets:
        eval_sets = [(task.name, task, test_records)]
    stats = {**train_stats, **test_stats}
    return RunData(task, train_records, test_records, eval_sets, stats)


def _optimizer(optim: OptimSettings) -> tuple[Any, Any]:
    schedule = make_schedule(
        optim.lr, warmup_steps=optim.warmup_steps, kind=optim.schedule,
        total_steps=optim.total_steps,
    )  # fmt: skip
    tx = make_optimizer(
        schedule, weight_decay=optim.weight_decay, b1=optim.b1, b2=optim.b2, eps=optim.eps,
        clip_norm=optim.grad_clip,
    )  # fmt: skip
    return schedule, tx


def _learner(settings: RunSettings, model_dir: pathlib.Path, prompts: ChatPrompts, pad_id: int):
    """The weights, read once straight into their shards on the mesh, and the jitted step."""
    model_cfg, step_cfg = settings.model, settings.step
    schedule, tx = _optimizer(settings.optim)
    mesh = make_mesh(settings.mesh)
    train_model, model_config = from_pretrained(
        model_dir,
        dtype=jnp.dtype(model_cfg.param_dtype),
        compute_dtype=jnp.dtype(model_cfg.compute_dtype),
        lora=model_cfg.lora,
        seed=settings.loop.seed,
        attention=model_cfg.attention,
        remat=model_cfg.remat,
        mesh=mesh,
        rules=settings.rules,
    )
    graphdef, state, shardings = train_state_from_model(
        train_model, tx, mesh=mesh, seed=settings.loop.seed, teacher_mode=step_cfg.teacher_mode,
        trainable=trainable_filter(model_cfg.lora), rules=settings.rules,
    )  # fmt: skip
    b_shardings = batch_shardings(mesh, settings.rules)
    train_step = make_train_step(
        graphdef, tx, step_cfg, state_shardings=shardings, batch_shardings=b_shardings,
        schedule=schedule,
    )  # fmt: skip
    profile = settings.loop.profile_teacher_forward and step_cfg.needs_teacher
    learner = Learner(
        state=state,
        graphdef=graphdef,
        state_shardings=shardings,
        batch_shardings=b_shardings,
        train_step=train_step,
        step_cfg=step_cfg,
        mesh=mesh,
        prompts=prompts,
        pad_id=pad_id,
        vocab_size=model_config.vocab_size,
        teacher_forward=make_teacher_forward(graphdef) if profile else None,
    )
    return learner, model_config


def build(cfg: Any) -> Run:
    """Validate the config and build data, rollout worker, algorithm and learner."""
    settings = run_settings(cfg, num_devices=jax.device_count())
    loaded = load_data(settings.data)  # a missing data file fails before any model load
    model_dir = resolve_model_dir(settings.model, settings.loop.run_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = ChatPrompts(tokenizer, settings.prompts)
    # Prompt budgets and the task's data are checked before the model loads (minutes for an 8B).
    run_data = _run_data(cfg, settings, prompts, loaded)
    vocab_size = read_config(model_dir).vocab_size
    validate_config(cfg, vocab_size=vocab_size, num_devices=jax.device_count())
    stop_ids = stop_token_ids(model_dir, tokenizer)
    pad = tokenizer.pad_token_id
    pad_id = int(pad if pad is not None else stop_ids[0])
    learner, model_config = _learner(settings, model_dir, prompts, pad_id)
    engine_params = engine_params_fn(learner.graphdef, settings.model.lora)
    # The engine's copy comes from the trainer's params: the checkpoint is read once.
    model = engine_model(settings.engine.kind, model_config, engine_params, learner.state)
    engine, weights = start_engine(settings.engine, model, model_dir, engine_params)
    worker = RolloutWorker(
        engine=engine,
        weights=weights,
        prompts=prompts,
        task=run_data.task,
        stop_ids=tuple(stop_ids),
        rollout=settings.rollout,
        engine_settings=settings.engine,
        seed=settings.loop.seed,
    )
    algorithm = settings.algorithm
    host_state = algorithm.init_state(settings.loop.seed)
    return Run(cfg, settings, model_dir, run_data, worker, algorithm, learner, host_state)
