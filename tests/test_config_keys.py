"""No dead config keys: every leaf key of every preset of every config changes the run.

For each key, the test sets another valid value and checks that `run_settings(cfg)` (what
`build` and the loop use, and nothing else: step config, algorithm, optimizer, mesh,
model, prompts, data, sampling, engine, loop) changes. Cheap: no model is built, nothing
compiles. A new key that fails here is read by nothing: read it in
`jaxsd/train/settings.py::run_settings`, delete it, or (run-time only) list it below.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import pytest

from jaxsd import algorithms
from jaxsd.models.sharding import LOGICAL_AXES
from jaxsd.train.settings import run_settings

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(
    p.stem for p in (REPO / "configs").glob("*.py") if p.stem not in ("__init__", "base")
)


def _base_presets() -> tuple[str | None, ...]:
    spec = importlib.util.spec_from_file_location("cfg_base", REPO / "configs" / "base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(None if p == "default" else p for p in module.PRESETS)


PRESETS = _base_presets()  # every preset configs/base.py knows
THIS_FILE = "tests/test_config_keys.py"

# Keys that build nothing the run uses; each says why it still belongs in a config.
RUN_TIME_ONLY = {
    # The preset's name: configs/*.py branch on it while they build the config.
    "preset",
}
# Keys whose wiring lands in another change; skipped here until then (then delete the entry).
PENDING: set[str] = set()
# Keys that act only when another key has a value: walked with that value set on both sides.
CONDITIONS = {
    "model.lora.alpha": {"model.lora.rank": 8},  # rank 0 = full fine-tuning, no adapters
    "model.lora.targets": {"model.lora.rank": 8},
    # thinking on requires keep_thinking=True (validate_config); off, both values are valid
    "algorithm.keep_thinking": {"model.enable_thinking": False},
    # more batch shards must still split into the micro-batches: walked with one micro-batch
    "mesh.data": {"optim.micro_batches": 1},
    "mesh.fsdp": {"optim.micro_batches": 1},
    # colocated: JAX's and vLLM's memory shares must fit one GPU together
    "placement.mode": {"rollout.vllm.gpu_memory_utilization": 0.15},
}
# (key, config file or "*" for all) pairs where the key has one valid value only, and why.
SINGLE_VALUED = {
    # The KL penalty needs a reference model (an EMA or fixed teacher); GRPO runs without one.
    ("loss.kl_coef", "grpo"),
    ("loss.kl_coef", "grpo_no_norm"),
    # Only `file:` tasks take a reward; no preset trains one (tests/test_tasks_custom.py).
    ("task.reward", "*"),
}
# Sections read by another entry point than the training loop (not by run_settings).
OTHER_ENTRY_POINTS = {
    # jaxsd.test_time.run_test_time (scripts/test_time.py) reads test_time.* itself.
    "test_time",
}


class NoAlternative(AssertionError):
    """No other valid value of a key could be found."""


def _swap(*pairs: tuple[Any, Any]) -> Callable[[Any], list[Any]]:
    table = {a: b for a, b in pairs} | {b: a for a, b in pairs}
    return lambda v: [table[v]] if v in table else []


# key -> candidate values for keys whose type gives no generic alternative (strings, None)
ALTERNATIVES: dict[str, Callable[[Any], list[Any]]] = {
    "run_dir": lambda v: [v + "_other"],
    "model.path": lambda v: ["other/model" if v else "assets/tiny_base"],
    "model.param_dtype": _swap(("float32", "bfloat16")),
    "model.compute_dtype": _swap(("float32", "bfloat16")),
    "model.attention": _swap(("jaxsd", "xla")),
    "model.enable_thinking": lambda v: [True, False] if v is None else [not v],
    "model.lora.targets": lambda v: ["q,v" if v != "q,v" else "q,k,v"],
    "task.name": lambda v: [
        {
            "arithmetic": "tool_call",
            "miniature": "arithmetic",
            "math_aime": "math500",
            "mbpp": "humaneval",
            "livecodebench": "mbpp",
        }.get(v, "sciknoweval_physics")
    ],
    "task.data_dir": lambda v: ["/elsewhere/data" if v == "" else ""],
    "task.eval_sets": lambda v: ["aime:2024" if v == "" else ""],
    "task.kwargs.feedback_style": _swap(("rich", "sdpo")),
    "rollout.engine": _swap(("jax", "vllm")),
    "loss.loss_agg_mode": _swap(("token-mean", "seq-mean-token-mean")),
    "loss.kl_estimator": _swap(("k3", "k1")),
    "loss.topk_block": lambda v: [64 if v is None else None],
    "optim.schedule": _swap(("constant", "cosine")),
    "algorithm.correct_selector": _swap(("shortest", "longest")),
    "algorithm.wrong_selector": _swap(("longest", "shortest")),
    "algorithm.weighting": _swap(("frontier", "fixed")),
    "algorithm.name": lambda v: ["grpo" if v == "sdpo" else "sdpo"],
    "rollout.weights_dir": lambda v: ["run" if v != "run" else "auto", "/elsewhere/weights"],
    "rollout.vllm.dtype": lambda v: ["float16"],  # "auto" = model.compute_dtype (fp32 | bf16)
    "rollout.vllm.sleep_between_rollouts": lambda v: [True, False] if v is None else [not v],
    "placement.mode": _swap(("separate", "colocated")),
    "placement.trainer_gpus": lambda v: ["0" if v == "" else ""],
    "placement.rollout_gpus": lambda v: ["1" if v == "" else ""],
    "log.backends": lambda v: ["jsonl" if v != "jsonl" else "jsonl,tensorboard"],
    "log.project": lambda v: [v + "_other"],
    "task.module": lambda v: ["json" if v == "" else ""],  # any importable module
    "task.overlong_prompts": _swap(("filter", "error")),
    "task.kwargs.path": lambda v: [v + ".other"],
    "loss.policy_loss": _swap(("ppo", "gspo")),
    "loss.loss_agg_norm": lambda v: [1024.0] if v is None else [v * 2],
    "rollout.kv_cache_dtype": lambda v: ["bfloat16" if v != "bfloat16" else ""],
    "resume_step": lambda v: [3] if v is None else [None],
    # mesh.rules.<logical axis>: a sharded axis replicated, a replicated one sharded
    **{f"mesh.rules.{name}": lambda v: ["" if v else "tensor"] for name in LOGICAL_AXES},
}


def load(method: str, preset: str | None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(
        f"cfg_{method}", REPO / "configs" / f"{method}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def leaf_keys(node: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaf_keys(value, path + ".")
        else:
            yield path, value


def generic(value: Any) -> list[Any]:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):  # +1, or a divisor-friendly x2 / half (batch splits)
        return [value + 1, value * 2, value // 2] if value >= 0 else [1]
    if isinstance(value, float):
        return [value * 0.5, value * 2, value + 0.1] if value else [0.1, 0.5]
    return []


# task.name alternatives whose constructor takes other kwargs: tried with the task's defaults.
TASK_FAMILY_CHANGES = ("tool_call", "mbpp")


def with_value(cfg: ml_collections.ConfigDict, key: str, value: Any) -> ml_collections.ConfigDict:
    out = copy.deepcopy(cfg)
    section, _, field = key.rpartition(".")
    node = out
    for part in section.split(".") if section else ():
        node = node[part]
    with out.unlocked(), node.ignore_type():
        node[field] = value
    if key == "task.name" and value in TASK_FAMILY_CHANGES:
        out.task.kwargs = ml_collections.ConfigDict()  # another task family: its defaults
    if key == "algorithm.name":  # another method: its own hyper-parameters, METHODS defaults
        defaults = algorithms.get_algorithm(value)
        fields = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)}
        out.algorithm = ml_collections.ConfigDict(fields)
    return out


def changed_config(cfg: ml_collections.ConfigDict, key: str, value: Any):
    """(another valid value, its config, its settings) or raise naming what to add."""
    candidates = ALTERNATIVES[key](value) if key in ALTERNATIVES else generic(value)
    errors = []
    for candidate in candidates:
        if candidate == value:
            continue
        mutated = with_value(cfg, key, candidate)
        try:
            return candidate, run_settings(mutated)
        except (ValueError, TypeError, KeyError) as err:  # invalid value: try the next one
            errors.append(f"{candidate!r}: {err}")
    raise NoAlternative(
        f"config key {key!r} (value {value!r}) has no other valid value to try "
        f"(tried: {errors or 'none'}); add an entry for it to ALTERNATIVES in {THIS_FILE}"
    )


@pytest.mark.parametrize("method", CONFIG_FILES)
def test_every_key_of_every_preset_reaches_the_run(method):
    for preset in PRESETS:
        cfg = load(method, preset)
        base = run_settings(cfg)
        assert run_settings(copy.deepcopy(cfg)) == base  # comparisons are by value
        for key, value in leaf_keys(cfg):
            if key in RUN_TIME_ONLY or key in PENDING or key.split(".")[0] in OTHER_ENTRY_POINTS:
                continue
            start, before = cfg, base
            for other, other_value in CONDITIONS.get(key, {}).items():
                start = with_value(start, other, other_value)
                before = run_settings(start)
            try:
                new, settings = changed_config(start, key, value)
            except NoAlternative:
                if (key, method) in SINGLE_VALUED or (key, "*") in SINGLE_VALUED:
                    continue
                raise
            if settings == before:
                pytest.fail(
                    f"config key {key!r} of configs/{method}.py:{preset or 'default'} changed "
                    f"{value!r} -> {new!r} but jaxsd.train.settings.run_settings(cfg) did not: "
                    "nothing "
                    "the run builds reads it. Read it in run_settings (into the settings the loop "
                    "uses: StepConfig via step_config, the algorithm, EngineSettings, "
                    "LoopSettings, ...), delete it from configs/, or, if it matters only at run "
                    f"time and builds nothing, add it to RUN_TIME_ONLY in {THIS_FILE} with a "
                    "comment saying why."
                )


def test_allow_lists_name_existing_keys():
    keys = {k for m in CONFIG_FILES for p in PRESETS for k, _ in leaf_keys(load(m, p))}
    listed = RUN_TIME_ONLY | PENDING | set(ALTERNATIVES) | set(CONDITIONS)
    stale = sorted((listed | {key for key, _ in SINGLE_VALUED}) - keys)
    sections = {k.split(".")[0] for k in keys}
    stale += sorted(OTHER_ENTRY_POINTS - sections)
    assert not stale, f"{THIS_FILE} lists keys no config has: {stale}; delete those entries"


def test_a_key_nothing_reads_leaves_the_settings_unchanged():
    cfg = load("sdpo", "smoke")
    with cfg.unlocked():
        cfg.rollout.log_every = 1  # a key nothing reads
    base = run_settings(cfg)
    new, settings = changed_config(cfg, "rollout.log_every", 1)
    assert new == 2 and settings == base  # the walk above reports exactly this case
