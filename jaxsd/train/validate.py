"""Config validation: every bad value fails before any compile, naming the key and the fix."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jaxsd import algorithms
from jaxsd.losses.aggregate import AGG_MODES as LOSS_AGG_MODES
from jaxsd.models.config import ATTENTION_IMPLS
from jaxsd.models.lora import LORA_TARGETS
from jaxsd.models.sharding import DEFAULT_RULES, LOGICAL_AXES, Rules, rule_axes, rules_from_strings
from jaxsd.train.batch import LENGTH_BUCKETS
from jaxsd.train.mesh import AXES, resolve_mesh_shape
from jaxsd.train.step import POLICY_LOSSES

ENGINES = ("jax", "vllm")
SCHEDULES = ("constant", "cosine", "linear")  # jaxsd.train.optimizer.make_schedule
KL_ESTIMATORS = ("k1", "k2", "k3")  # jaxsd.losses.policy.kl_penalty
MODEL_DTYPES = ("float32", "bfloat16", "float16")
REQUIRED_KEYS = (
    "total_steps",
    "seed",
    "run_dir",
    "resume",
    "eval_every",
    "checkpoint_every",
    "model",
    "task",
    "rollout",
    "algorithm",
    "loss",
    "optim",
    "mesh",
    "rollout.engine",
    "rollout.n",
    "rollout.temperature",
    "rollout.top_p",
    "rollout.max_new_tokens",
    "task.questions_per_step",
    "algorithm.name",
    "loss.top_k",
    "loss.alpha",
    "loss.loss_agg_mode",
    "optim.lr",
    "mesh.data",
    "mesh.fsdp",
    "mesh.tensor",
)


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        if isinstance(node, Mapping) or hasattr(node, "keys"):
            if part not in node:
                raise ValueError(f"config key {key!r} is missing; start from configs/base.py")
            node = node[part]
        else:
            raise ValueError(f"config key {key!r} is missing; start from configs/base.py")
    return node


def _check(cfg: Any, key: str, ok: Callable[[Any], bool], rule: str) -> None:
    value = _get(cfg, key)
    try:
        good = ok(value)
    except TypeError:
        good = False
    if not good:
        raise ValueError(f"config {key}={value!r} is invalid: {rule}")


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def lora_targets(targets: str) -> tuple[str, ...]:
    """`model.lora.targets` ("q,v,...") -> the projection names, blanks dropped."""
    return tuple(t.strip() for t in targets.split(",") if t.strip())


def _check_lora(cfg: Any) -> None:
    _check(cfg, "model.lora.rank", lambda v: _int(v) and v >= 0, "use 0 (no LoRA) or a rank >= 1")
    _check(cfg, "model.lora.alpha", lambda v: _number(v) and v > 0, "use an alpha > 0")
    _check(
        cfg,
        "model.lora.targets",
        lambda v: bool(lora_targets(v)) and set(lora_targets(v)) <= set(LORA_TARGETS),
        f"use a comma-separated, non-empty subset of {','.join(LORA_TARGETS)}",
    )


def _check_rule(name: str, value: Any) -> None:
    if name not in LOGICAL_AXES:
        raise ValueError(
            f"config mesh.rules.{name} is not a logical axis; the model and batch use "
            f"{', '.join(LOGICAL_AXES)}"
        )
    use = f"use comma-separated mesh axes of {AXES}, each at most once ('' = replicated)"
    if not isinstance(value, str):
        raise ValueError(f"config mesh.rules.{name}={value!r} is invalid: {use}")
    axes = [a.strip() for a in value.split(",") if a.strip()]
    unknown = [a for a in axes if a not in AXES]
    if unknown:
        raise ValueError(f"config mesh.rules.{name}={value!r}: no mesh axis {unknown[0]!r}; {use}")
    if len(set(axes)) != len(axes):
        raise ValueError(f"config mesh.rules.{name}={value!r} names a mesh axis twice; {use}")


def mesh_rules(cfg: Any) -> Rules:
    """`mesh.rules` (logical axis -> "mesh,axes") as a rules table; DEFAULT_RULES without it."""
    if "rules" not in _get(cfg, "mesh"):
        return DEFAULT_RULES
    table = dict(_get(cfg, "mesh.rules"))
    for name, value in table.items():
        _check_rule(name, value)
    missing = [n for n in LOGICAL_AXES if n not in table]
    if missing:
        raise ValueError(
            f"config mesh.rules has no rule for {missing}; give each logical axis one "
            "('' = replicated), as configs/base.py does"
        )
    return rules_from_strings({name: table[name] for name in LOGICAL_AXES})


def _batch_shards(shape: dict[str, int], rules: Rules) -> int:
    """How many ways the `batch` rule splits the sequences (1 while an axis is still -1)."""
    sizes = [shape[a] for a in rule_axes(rules, "batch")]
    return 1 if -1 in sizes else math.prod(sizes)


def _check_micro_batches(cfg: Any, batch: int, batch_shards: int) -> None:
    """Each micro-batch must hold a whole number of rows on every data-parallel shard."""
    if "micro_batches" not in _get(cfg, "optim"):
        return
    n = _get(cfg, "optim.micro_batches")
    _check(cfg, "optim.micro_batches", lambda v: _int(v) and v >= 1, "use an integer >= 1")
    if batch % (n * batch_shards):
        raise ValueError(
            f"config optim.micro_batches={n} does not split the batch task.questions_per_step × "
            f"rollout.n = {batch} into equal slices over the {batch_shards} shards of "
            f"mesh.rules.batch ({n} × {batch_shards} must divide {batch}); pick a divisor of "
            f"{batch // batch_shards}"
        )


def mesh_shape(cfg: Any, num_devices: int | None = None) -> dict[str, int]:
    """`mesh.{data,fsdp,tensor}` with a -1 axis resolved to the remaining devices."""
    shape = {axis: _get(cfg, f"mesh.{axis}") for axis in ("data", "fsdp", "tensor")}
    for axis, size in shape.items():
        if not (_int(size) and (size >= 1 or size == -1)):
            raise ValueError(f"config mesh.{axis}={size!r} is invalid: use a size >= 1, or -1")
    free = [a for a, s in shape.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"config mesh has -1 on {free}; at most one axis may be -1")
    if num_devices is None:
        return shape
    fixed = math.prod(s for s in shape.values() if s != -1)
    try:
        resolved = resolve_mesh_shape(tuple(shape.values()), num_devices)
    except ValueError:
        fill = f"mesh.{free[0]}=-1 cannot fill" if free else "mesh data×fsdp×tensor ="
        raise ValueError(
            f"config {fill} {num_devices} devices: the {'other ' if free else ''}axes multiply "
            f"to {fixed}; set sizes whose product is the device count (or one axis to -1)"
        ) from None
    return dict(zip(shape, resolved, strict=True))


def _check_vllm_rollout(cfg: Any) -> None:
    from jaxsd.rollout.placement import placement_from_config

    dtypes = ("auto", *MODEL_DTYPES)
    _check(cfg, "rollout.vllm.dtype", lambda v: v in dtypes, f"use one of {dtypes}")
    _check(
        cfg, "rollout.weights_dir", lambda v: isinstance(v, str) and v != "",
        "use 'auto' (RAM when it has room), 'run' (<run_dir>/weights) or a folder",
    )  # fmt: skip
    if "placement" not in cfg:
        raise ValueError("config has rollout.vllm but no placement section; see configs/base.py")
    placement_from_config(cfg)  # PlacementError (a ValueError) names the keys


def _check_task(cfg: Any) -> None:
    """The task builds from the config: a known name (after `task.module` registered its own),
    kwargs that are its parameters, with values its constructor accepts. Nothing loads."""
    from jaxsd.tasks.custom import task_from_config

    name = _get(cfg, "task.name")
    try:
        task_from_config(_get(cfg, "task"))
    except KeyError as err:  # an unknown task name
        raise ValueError(f"config task.name: {err.args[0]}") from err
    except (TypeError, ValueError) as err:
        if str(err).startswith("config "):  # already names its key
            raise
        raise ValueError(f"config task.kwargs for task {name!r}: {err}") from err


def check_prompt_lengths(cfg: Any, template_tokens: int) -> None:
    """The prompt budgets must leave room for a question beyond the chat template's own
    `template_tokens` (role markers, generation prompt), or every prompt is cut to nothing."""
    for key in ("task.max_prompt_len", "task.max_reprompt_len"):
        value = _get(cfg, key)
        if value <= template_tokens:
            raise ValueError(
                f"config {key}={value} is invalid: the chat template alone takes "
                f"{template_tokens} tokens, leaving no room for the question; use at least "
                f"{template_tokens + 16}"
            )


def suggest_key(request: str, keys: Iterable[str]) -> str | None:
    """The existing key a mistyped `request` most likely meant: a close spelling, or the key
    that abbreviates it (`learning_rate` -> `lr`)."""
    keys = [str(k) for k in keys]
    close = difflib.get_close_matches(request, keys, n=1, cutoff=0.6)
    if close:
        return close[0]
    initials = "".join(word[0] for word in request.split("_") if word)
    return next((k for k in keys if len(initials) > 1 and k == initials), None)


def unknown_key_error(cfg: Any, dotted: str) -> str | None:
    """For a `--config.<dotted>` override: None when the key exists, else a message naming
    the first missing part, the closest existing key and the keys of that section."""
    node, path = cfg, []
    for part in dotted.split("."):
        if not hasattr(node, "keys"):
            return None  # below a leaf: the flag parser names that itself
        if part not in node:
            where = ".".join(path) or "the config"
            guess = suggest_key(part, node.keys())
            hint = f"; did you mean {'.'.join([*path, guess])}?" if guess else ""
            return (
                f"config key {'.'.join([*path, part])} does not exist{hint} ({where} has: "
                f"{', '.join(sorted(str(k) for k in node.keys()))})"
            )
        node, path = node[part], [*path, part]
    return None


# Keys checked only where the config has them (older or hand-made configs may not).
_SECTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "loss.is_clip": (lambda v: _number(v) and v > 0, "use a cap > 0 (SDPO: 2)"),
    "loss.clip_low": (lambda v: _number(v) and 0 <= v < 1, "use 0 <= clip_low < 1"),
    "loss.rollout_is": (lambda v: isinstance(v, bool), "use True or False"),
    "loss.rollout_is_threshold": (lambda v: _number(v) and v > 0, "use a cap C > 0 (2)"),
    "loss.policy_loss": (lambda v: v in POLICY_LOSSES, f"use one of {POLICY_LOSSES}"),
    "loss.loss_agg_norm": (
        lambda v: v is None or (_number(v) and v > 0),
        "use None (the padded response length) or a constant > 0",
    ),
    "loss.clip_high": (lambda v: _number(v) and v >= 0, "use clip_high >= 0"),
    "loss.dual_clip": (lambda v: v is None or (_number(v) and v > 1), "use None or c > 1"),
    "loss.teacher_ema": (lambda v: _number(v) and 0 < v <= 1, "use 0 < λ <= 1"),
    "loss.kl_coef": (lambda v: _number(v) and v >= 0, "use a coefficient >= 0"),
    "loss.kl_estimator": (lambda v: v in KL_ESTIMATORS, f"use one of {KL_ESTIMATORS}"),
    "loss.chunk_size": (lambda v: _int(v) and v >= 1, "use an integer >= 1"),
    "loss.topk_block": (lambda v: v is None or (_int(v) and v >= 1), "use None or >= 1"),
    "optim.weight_decay": (lambda v: _number(v) and v >= 0, "use a decay >= 0"),
    "optim.grad_clip": (lambda v: _number(v) and v > 0, "use a global-norm clip > 0"),
    "optim.warmup_steps": (lambda v: _int(v) and v >= 0, "use an integer >= 0"),
    "optim.schedule": (lambda v: v in SCHEDULES, f"use one of {SCHEDULES}"),
    "optim.b1": (lambda v: _number(v) and 0 <= v < 1, "use 0 <= b1 < 1 (Adam: 0.9)"),
    "optim.b2": (lambda v: _number(v) and 0 <= v < 1, "use 0 <= b2 < 1 (Adam: 0.999)"),
    "optim.eps": (lambda v: _number(v) and v > 0, "use eps > 0 (Adam: 1e-8); 0 divides 0/0"),
    "rollout.eval_n": (lambda v: _int(v) and v >= 1, "use an integer >= 1"),
    "rollout.eval_top_p": (lambda v: _number(v) and 0 < v <= 1, "use 0 < eval_top_p <= 1"),
    "rollout.eval_temperature": (lambda v: _number(v) and v >= 0, "use >= 0 (0 = greedy)"),
    "rollout.eval_questions": (lambda v: _int(v) and v >= 0, "use >= 0 (0 = whole split)"),
    "rollout.timeout_s": (lambda v: _number(v) and v >= 0, "use seconds >= 0 (0 = auto)"),
    "rollout.restart_on_failure": (lambda v: isinstance(v, bool), "use True or False"),
    "rollout.async_steps": (
        lambda v: _int(v) and v in (0, 1),
        "use 0 (on-policy) or 1 (sample step N+1 while step N trains, one step stale)",
    ),
    "task.max_reprompt_len": (lambda v: _int(v) and v >= 1, "use an integer >= 1"),
    "model.param_dtype": (lambda v: v in MODEL_DTYPES, f"use one of {MODEL_DTYPES}"),
    "model.compute_dtype": (lambda v: v in MODEL_DTYPES, f"use one of {MODEL_DTYPES}"),
    "model.attention": (lambda v: v in ATTENTION_IMPLS, f"use one of {ATTENTION_IMPLS}"),
    "model.remat": (lambda v: isinstance(v, bool), "use True or False"),
    "task.overlong_prompts": (lambda v: v in ("filter", "error"), "use 'filter' or 'error'"),
    "task.max_prompt_len": (lambda v: _int(v) and v >= 1, "use an integer >= 1"),
    "model.enable_thinking": (
        lambda v: v is None or isinstance(v, bool),
        "use True, False or None (None = the chat template's default)",
    ),
    "rollout.eval_top_k": (lambda v: _int(v) and v >= 0, "use an integer >= 0 (0 = off)"),
    "rollout.eval_min_p": (lambda v: _number(v) and 0 <= v <= 1, "use 0 <= min_p <= 1"),
    "task.eval_sets": (lambda v: isinstance(v, str), "use 'task:split,...' or ''"),
}
# CISPO's IS weight may drop its lower bound: clip_low = 1 clips at 0 (the paper's).
_CISPO_CLIP_LOW = (
    lambda v: _number(v) and 0 <= v <= 1,
    "use 0 <= clip_low <= 1 with policy_loss='cispo'",
)
_TOP_LEVEL_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "keep_checkpoints": (lambda v: _int(v) and v >= 1, "keep >= 1 (resume needs one)"),
    "resume_step": (lambda v: v is None or (_int(v) and v >= 1), "use None or a step >= 1"),
    "paced_offline_n": (lambda v: _int(v) and v >= 1, "use >= 1 rollouts per question"),
}


def _check_run(cfg: Any) -> None:
    """Every required key is there; the run's own keys (steps, seed, folder, schedule)."""
    for key in REQUIRED_KEYS:
        _get(cfg, key)
    _check(cfg, "total_steps", lambda v: _int(v) and v >= 1, "use an integer >= 1")
    _check(cfg, "seed", lambda v: _int(v) and v >= 0, "use an integer >= 0")
    _check(cfg, "run_dir", lambda v: isinstance(v, str) and v != "", "use a folder path")
    _check(cfg, "resume", lambda v: isinstance(v, bool), "use True or False")
    for key in ("eval_every", "checkpoint_every"):
        _check(cfg, key, lambda v: _int(v) and v >= 0, "use an integer >= 0 (0 = never)")


def _check_rollout(cfg: Any) -> None:
    """Engine and training-sampling keys, and the questions per step."""
    _check(cfg, "rollout.engine", lambda v: v in ENGINES, f"use one of {ENGINES}")
    _check(cfg, "rollout.n", lambda v: _int(v) and v >= 2, "use >= 2 rollouts per question")
    _check(cfg, "rollout.temperature", lambda v: _number(v) and v > 0, "use a temperature > 0")
    _check(cfg, "rollout.top_p", lambda v: _number(v) and 0 < v <= 1, "use 0 < top_p <= 1")
    _check(cfg, "rollout.max_new_tokens", lambda v: _int(v) and v >= 1, "use an integer >= 1")
    _check(cfg, "rollout.slots", lambda v: _int(v) and v >= 0, "use an integer >= 0 (0 = all rows)")
    kv_dtypes = ("", "float32", "bfloat16", "float16")
    _check(cfg, "rollout.kv_cache_dtype", lambda v: v in kv_dtypes, f"use one of {kv_dtypes}")
    _check(cfg, "task.questions_per_step", lambda v: _int(v) and v >= 1, "use an integer >= 1")


def _check_algorithm(cfg: Any) -> None:
    """A registered method whose own dataclass accepts `algorithm.*`."""
    name = _get(cfg, "algorithm.name")
    if name not in algorithms.REGISTRY:
        raise ValueError(
            f"config algorithm.name={name!r} is unknown; use one of {sorted(algorithms.REGISTRY)}"
        )
    try:
        algorithms.from_config(_get(cfg, "algorithm"))  # the method's own range checks
    except TypeError as err:
        raise ValueError(f"config algorithm.* has a value of the wrong type: {err}") from err


def _check_loss(cfg: Any, vocab_size: int | None) -> None:
    """The distillation divergence's top-k (within the vocabulary), alpha and aggregation."""
    top_k_rule = "use None (full vocabulary) or an integer >= 1"
    if vocab_size is not None:
        top_k_rule += f" and <= the vocab size {vocab_size}"
    _check(
        cfg,
        "loss.top_k",
        lambda v: v is None or (_int(v) and v >= 1 and (vocab_size is None or v <= vocab_size)),
        top_k_rule,
    )
    _check(cfg, "loss.alpha", lambda v: _number(v) and 0 <= v <= 1, "alpha must lie in [0, 1]")
    _check(cfg, "loss.loss_agg_mode", lambda v: v in LOSS_AGG_MODES, f"use one of {LOSS_AGG_MODES}")


def _check_optional_keys(cfg: Any) -> None:
    """`_SECTION_RULES` and `_TOP_LEVEL_RULES` for the keys the config has."""
    rules = dict(_SECTION_RULES)
    if _get(cfg, "loss").get("policy_loss") == "cispo":
        rules["loss.clip_low"] = _CISPO_CLIP_LOW
    for key, (ok, rule) in rules.items():
        section, field = key.split(".")
        if field in _get(cfg, section):
            _check(cfg, key, ok, rule)
    for key, (ok, rule) in _TOP_LEVEL_RULES.items():
        if key in cfg:
            _check(cfg, key, ok, rule)


def _check_model(cfg: Any) -> None:
    """LoRA, and model switches that another key rules out (thinking, cuDNN attention)."""
    model = _get(cfg, "model")
    if "lora" in model:
        _check_lora(cfg)
    algorithm = _get(cfg, "algorithm")
    if model.get("enable_thinking") is True and not algorithm.get("keep_thinking", True):
        raise ValueError(
            f"config model.enable_thinking=True with algorithm.name={algorithm['name']!r} and "
            "algorithm.keep_thinking=False would strip y+'s <think> reasoning from SSOPD's "
            "privileged context; set --config.algorithm.keep_thinking=True"
        )
    if model.get("attention") == "cudnn" and model.get("compute_dtype", "float32") == "float32":
        raise ValueError(
            "config model.attention='cudnn' needs model.compute_dtype 'bfloat16' (cuDNN flash "
            "attention has no fp32 kernel); set compute_dtype or use attention='jaxsd'"
        )


def _check_batch(cfg: Any, num_devices: int | None) -> None:
    """The mesh resolves on the devices and the batch splits over its shards and micro-batches."""
    shape = mesh_shape(cfg, num_devices)
    rules = mesh_rules(cfg)
    batch_shards = _batch_shards(shape, rules)
    batch = _get(cfg, "task.questions_per_step") * _get(cfg, "rollout.n")
    if batch % batch_shards:
        axes = " × ".join(f"mesh.{a}" for a in rule_axes(rules, "batch"))
        raise ValueError(
            f"config batch task.questions_per_step × rollout.n = {batch} is not divisible by "
            f"{axes} = {batch_shards} (the axes of mesh.rules.batch); change "
            "task.questions_per_step, the mesh or mesh.rules.batch"
        )
    _check_micro_batches(cfg, batch, batch_shards)
    _check_length_shards(shape, rules)


def _check_length_shards(shape: dict[str, int], rules: Rules) -> None:
    """Every padded length (LENGTH_BUCKETS) splits evenly over the `length` rule's axes."""
    axes = rule_axes(rules, "length")
    shards = math.prod(shape[a] for a in axes)
    shortest = min(LENGTH_BUCKETS)
    if shards > 0 and shortest % shards:  # -1 (devices unknown) makes shards negative
        sizes = " × ".join(f"mesh.{a}" for a in axes)
        raise ValueError(
            f"config mesh.rules.length={','.join(axes)!r} splits token positions over {sizes} "
            f"= {shards} shards, but sequences are padded to powers of two from {shortest} "
            f"tokens; map length to axes whose sizes multiply to a power of two <= {shortest}, "
            'or to "" (not split)'
        )


def validate_config(
    cfg: Any, *, vocab_size: int | None = None, num_devices: int | None = None
) -> None:
    """Raise ValueError naming the first invalid key and the fix; None when the config is good."""
    _check_run(cfg)
    _check_rollout(cfg)
    _check_algorithm(cfg)
    _check_loss(cfg, vocab_size)
    _check_optional_keys(cfg)
    _check_task(cfg)
    _check(cfg, "optim.lr", lambda v: _number(v) and v > 0, "the learning rate must be > 0")
    _check_model(cfg)
    if "vllm" in _get(cfg, "rollout"):
        _check_vllm_rollout(cfg)
    _check_batch(cfg, num_devices)
