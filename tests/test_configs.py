"""Every config file × preset loads (by path, as config_flags does) and validates; bad values
fail naming their key; the qwen3_8b preset carries the paper's table A.2."""

import dataclasses
import importlib.util
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from jaxsd import algorithms
from jaxsd.train.validate import check_prompt_lengths, unknown_key_error, validate_config

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
METHOD_FILES = (
    "sc_sdpo",
    "sdpo",
    "grpo",
    "grpo_no_norm",
    "paced",
    "hard_filter",
    "srpo",
    "ssopd",
    "drift",
)
PRESETS = (None, "smoke", "qwen3_8b", "gpu_0p6b", "miniature")
EXPECTED_ALGORITHM = {"grpo_no_norm": "grpo"}


def load(name, preset=None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


@pytest.fixture(scope="module")
def configs():
    return {(m, p): load(m, p) for m in METHOD_FILES for p in PRESETS}


def devices_and_vocab(preset):
    return {"qwen3_8b": (8, 151936), "gpu_0p6b": (1, 151936)}.get(preset, (1, 1024))


@pytest.mark.parametrize("method", METHOD_FILES)
def test_every_preset_loads_validates_and_has_the_shared_keys(configs, method):
    for preset in PRESETS:
        cfg = configs[(method, preset)]
        num_devices, vocab = devices_and_vocab(preset)
        validate_config(cfg, vocab_size=vocab, num_devices=num_devices)
        for key in ("total_steps", "seed", "run_dir", "resume", "eval_every", "checkpoint_every"):
            assert key in cfg
        assert cfg.rollout.engine == ("vllm" if preset == "qwen3_8b" else "jax")
        assert cfg.algorithm.name == EXPECTED_ALGORITHM.get(method, method)
        assert cfg.run_dir == f"runs/{method}_{preset or 'default'}_{{hash}}"
        # algorithm.* holds every hyper-parameter of the method and builds it
        algo = algorithms.from_config(cfg.algorithm)
        fields = {f.name for f in dataclasses.fields(algo)} - {"name"}
        assert set(cfg.algorithm) - {"name"} == fields
    assert configs[(method, "smoke")].total_steps == 3


def test_algorithm_defaults_are_methods_defaults_except_documented_overrides(configs):
    defaults = {n: algorithms.get_algorithm(n) for n in algorithms.REGISTRY}
    # SSOPD's paper preset thinks, so y+'s reasoning stays in its privileged context.
    overrides = {("grpo_no_norm", "normalize"): False, ("ssopd", "keep_thinking"): True}
    for method in METHOD_FILES:
        cfg = configs[(method, "qwen3_8b")].algorithm
        algo = defaults[cfg.name]
        for key in set(cfg) - {"name"}:
            want = overrides.get((method, key), getattr(algo, key))
            assert cfg[key] == want, (method, key)
    assert configs[("sc_sdpo", None)].algorithm.exponent == 0.5
    assert configs[("paced", None)].algorithm.exponent == 1.0
    assert configs[("ssopd", None)].algorithm.max_len == 256
    drift = configs[("drift", None)].algorithm
    assert (drift.ema_alpha, drift.delta, drift.theta_r, drift.buffer_size) == (0.7, 0.1, 0.5, 3)


@pytest.mark.parametrize("method", METHOD_FILES)
def test_qwen3_8b_preset_is_table_a2(configs, method):
    c = configs[(method, "qwen3_8b")]
    assert (c.task.questions_per_step, c.rollout.n) == (32, 8)
    assert (c.optim.lr, c.optim.schedule, c.optim.warmup_steps) == (1e-5, "constant", 10)
    assert (c.optim.weight_decay, c.optim.grad_clip) == (0.01, 1.0)
    assert (c.loss.top_k, c.loss.alpha, c.loss.teacher_ema) == (100, 0.5, 0.05)
    assert (c.task.max_prompt_len, c.rollout.temperature) == (2048, 1.0)
    want_response = 8192 if method.startswith("grpo") or method == "ssopd" else 2048
    assert c.rollout.max_new_tokens == want_response
    if method == "ssopd":
        return  # its own paper's setting: test_ssopd_preset_follows_its_paper
    # Table A.2's runs: Qwen3 without thinking, SciKnowEval one domain at a time, the papers'
    # feedback (SDPO's multiple-choice verifier gives none).
    assert c.model.enable_thinking is False
    assert c.task.name == "sciknoweval_chemistry"
    assert dict(c.task.kwargs) == {"feedback_style": "sdpo"}
    assert (c.task.eval_sets, c.rollout.eval_n, c.rollout.eval_top_k) == ("", 16, 0)


def test_ssopd_preset_follows_its_paper(configs):
    c = configs[("ssopd", "qwen3_8b")]
    assert c.task.name == "math_aime"
    assert c.task.eval_sets == "aime:2024,aime:2025,hmmt:test"
    assert c.model.enable_thinking is True and c.algorithm.keep_thinking is True
    assert c.model.lora.rank > 0 and c.model.lora.targets == "q,k,v,o,gate,up,down"
    sampling = (c.rollout.eval_n, c.rollout.eval_temperature, c.rollout.eval_top_p)
    assert sampling == (12, 0.6, 0.95)
    assert (c.rollout.eval_top_k, c.rollout.eval_min_p) == (20, 0.0)
    # thinking on with y+'s reasoning stripped is refused, naming the key to set
    c = load("ssopd", "qwen3_8b")
    c.algorithm.keep_thinking = False
    with pytest.raises(ValueError, match="algorithm.keep_thinking=True"):
        validate_config(c)


def test_default_presets_leave_the_chat_template_default():
    # assets/tiny_base was fine-tuned on prompts rendered without `enable_thinking`
    for method in METHOD_FILES:
        assert load(method).model.enable_thinking is None


INVALID = [
    ("algorithm.name", "ppo", "algorithm.name"),
    ("loss.alpha", 1.5, "loss.alpha"),
    ("loss.alpha", -0.1, "loss.alpha"),
    ("loss.top_k", 2000, "loss.top_k"),  # > vocab 1024
    ("loss.top_k", 0, "loss.top_k"),
    ("optim.lr", -1e-5, "optim.lr"),
    ("loss.loss_agg_mode", "mean", "loss.loss_agg_mode"),
    ("rollout.engine", "sglang", "rollout.engine"),
    ("rollout.n", 1, "rollout.n"),
    ("rollout.top_p", 0.0, "rollout.top_p"),
    ("rollout.slots", -1, "rollout.slots"),
    ("rollout.kv_cache_dtype", "fp8", "rollout.kv_cache_dtype"),
    ("rollout.temperature", 0.0, "rollout.temperature"),
    ("total_steps", 0, "total_steps"),
    ("checkpoint_every", -1, "checkpoint_every"),
    ("optim.grad_clip", 0.0, "optim.grad_clip"),
    ("loss.is_clip", 0.0, "loss.is_clip"),
    ("loss.teacher_ema", 2.0, "loss.teacher_ema"),
    ("task.questions_per_step", 3, "task.questions_per_step"),  # 3 × 4 = 12 on 8 shards
    ("mesh.fsdp", 3, "mesh"),  # 3 devices != 8
    ("algorithm.ema_alpha", 1.5, "algorithm.ema_alpha"),
    ("algorithm.buffer_size", 0, "algorithm.buffer_size"),
    ("optim.micro_batches", 0, "optim.micro_batches"),
    ("optim.micro_batches", 4, "optim.micro_batches"),  # 4 slices × 8 shards > 16 rows
    ("loss.policy_loss", "grpo", "loss.policy_loss"),
    ("loss.rollout_is", 1, "loss.rollout_is"),
    ("loss.rollout_is_threshold", 0.0, "loss.rollout_is_threshold"),
    ("loss.loss_agg_norm", -4.0, "loss.loss_agg_norm"),
    ("optim.b1", 1.0, "optim.b1"),
    ("optim.b2", float("nan"), "optim.b2"),
    ("optim.eps", 0.0, "optim.eps"),
    ("optim.lr", float("inf"), "optim.lr"),
    ("seed", -1, "seed"),
    ("keep_checkpoints", 0, "keep_checkpoints"),
    ("resume_step", 0, "resume_step"),
    ("rollout.eval_n", 0, "rollout.eval_n"),
    ("rollout.eval_top_p", 0.0, "rollout.eval_top_p"),
    ("rollout.timeout_s", -1.0, "rollout.timeout_s"),
    ("rollout.async_steps", 2, "rollout.async_steps"),
    ("rollout.async_steps", True, "rollout.async_steps"),
    ("loss.teacher_ema", 0.0, "loss.teacher_ema"),
    ("paced_offline_n", 0, "paced_offline_n"),
    ("task.max_prompt_len", 0, "task.max_prompt_len"),
    ("task.kwargs.train_size", 0, "task.kwargs.*train_size=0"),
    ("task.name", "gsm8k", "task.kwargs.digits is not a parameter of task 'gsm8k'"),
    ("task.name", "gsm9k", "task.name"),
]


@pytest.mark.parametrize("key,value,named", INVALID)
def test_invalid_values_fail_naming_the_key(key, value, named):
    cfg = load("drift")
    cfg.task.questions_per_step, cfg.rollout.n = 4, 4
    cfg.mesh.fsdp = 8  # batch 4 × 4 = 16 splits over 8 shards
    validate_config(cfg, vocab_size=1024, num_devices=8)
    with cfg.unlocked():
        section, _, field = key.rpartition(".")
        node = cfg[section] if section else cfg
        with node.ignore_type():
            node[field] = value
    with pytest.raises(ValueError, match=named.replace(".", r"\.").replace(r"\.*", ".*")):
        validate_config(cfg, vocab_size=1024, num_devices=8)


def test_missing_key_and_mesh_fill_rules():
    cfg = load("sdpo")
    del cfg["checkpoint_every"]
    with pytest.raises(ValueError, match="'checkpoint_every' is missing"):
        validate_config(cfg)
    cfg = load("sdpo")
    cfg.mesh.update(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="at most one axis"):
        validate_config(cfg)
    cfg = load("sdpo")
    cfg.mesh.update(data=3, fsdp=-1)
    with pytest.raises(ValueError, match="mesh.fsdp=-1 cannot fill 8"):
        validate_config(cfg, num_devices=8)
    with pytest.raises(ValueError, match="preset 'tiny'.*smoke"):
        load("sdpo", "tiny")
    # top_k = None is the full-vocabulary mode
    cfg = load("sdpo")
    with cfg.loss.ignore_type():
        cfg.loss.top_k = None
    validate_config(cfg, vocab_size=1024)


def test_command_line_overrides_through_config_flags():
    argv = [
        "train.py",
        f"--config={CONFIG_DIR / 'sc_sdpo.py'}:smoke",
        "--config.optim.lr=3e-6",
        "--config.algorithm.exponent=1.0",
    ]
    fv = flags.FlagValues()
    # config_flags registers the override flags from the argv it sees at definition time
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    cfg = fv.config
    assert (cfg.optim.lr, cfg.algorithm.exponent, cfg.total_steps) == (3e-6, 1.0, 3)
    validate_config(cfg, vocab_size=1024, num_devices=1)


@pytest.mark.parametrize("method", METHOD_FILES)
def test_rollout_is_is_on_for_vllm_presets_only_and_reaches_the_step(configs, method):
    from jaxsd.train.settings import step_config

    for preset in PRESETS:
        cfg = configs[(method, preset)]
        step = step_config(cfg, algorithms.from_config(cfg.algorithm).step_switches())
        assert step.rollout_is == (cfg.rollout.engine == "vllm") == (preset == "qwen3_8b")
        assert step.rollout_is_threshold == cfg.loss.rollout_is_threshold == 2.0
        assert (step.policy_loss, step.loss_agg_norm) == ("ppo", None)
        # SRPO's entropy-aware SDPO weights are on by default (paper), nowhere else.
        assert step.sd_entropy_beta == (1.0 if method == "srpo" else None)


def test_loss_switches_reach_the_step_config():
    from jaxsd.train.settings import step_config

    cfg = load("srpo")
    cfg.loss.policy_loss, cfg.loss.clip_low = "cispo", 1.0
    cfg.loss.loss_agg_norm, cfg.loss.rollout_is_threshold = 512.0, 3.0
    cfg.algorithm.entropy_weighting = False
    validate_config(cfg, vocab_size=1024, num_devices=1)
    step = step_config(cfg, algorithms.from_config(cfg.algorithm).step_switches())
    assert (step.policy_loss, step.clip_low, step.loss_agg_norm) == ("cispo", 1.0, 512.0)
    assert (step.rollout_is_threshold, step.sd_entropy_beta) == (3.0, None)
    cfg.algorithm.entropy_weighting, cfg.algorithm.entropy_beta = True, 0.5
    step = step_config(cfg, algorithms.from_config(cfg.algorithm).step_switches())
    assert step.sd_entropy_beta == 0.5
    cfg.algorithm.entropy_beta = -1.0
    with pytest.raises(ValueError, match="algorithm.entropy_beta"):
        validate_config(cfg, vocab_size=1024, num_devices=1)


def test_unknown_nested_keys_get_a_did_you_mean():
    cfg = load("sdpo")
    message = unknown_key_error(cfg, "optim.learning_rate")
    assert "optim.learning_rate does not exist; did you mean optim.lr?" in message
    assert "optim has: b1, b2, eps" in message
    assert "did you mean rollout.eval_top_p?" in unknown_key_error(cfg, "rollout.eval_topp")
    assert unknown_key_error(cfg, "optim.lr") is None and unknown_key_error(cfg, "task") is None


def test_prompt_lengths_leave_room_beyond_the_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    from jaxsd.tasks import chat_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = len(chat_token_ids(tokenizer, [{"role": "user", "content": ""}], 10**6))
    cfg = load("sdpo")
    check_prompt_lengths(cfg, template)
    cfg.task.max_reprompt_len = template
    with pytest.raises(ValueError, match=rf"task.max_reprompt_len={template} .* takes {template}"):
        check_prompt_lengths(cfg, template)


def test_train_script_names_an_unknown_nested_override(run_repo_script):
    result = run_repo_script(
        "scripts/train.py", f"--config={CONFIG_DIR / 'sdpo.py'}:smoke",
        "--config.optim.learning_rate=1e-3", timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "optim.learning_rate does not exist; did you mean optim.lr?" in result.stderr


def test_miniature_preset_is_paper_defaults_scaled_by_one_rule(configs):
    """docs/miniature.md: every method keeps its defaults, durations in steps shrink by
    60 / 200, and everything outside `algorithm` is the same for every method."""
    shared = None
    for method in METHOD_FILES:
        cfg = configs[(method, "miniature")]
        algo = algorithms.get_algorithm(cfg.algorithm.name)
        own = {("grpo_no_norm", "normalize"): False}
        if method == "drift":  # its stage-1 length is counted in steps: 10 * 60 / 200
            own[(method, "warmup_steps")] = round(algo.warmup_steps * 60 / 200)
        for key in set(cfg.algorithm) - {"name"}:
            assert cfg.algorithm[key] == own.get((method, key), getattr(algo, key)), (method, key)
        rest = cfg.to_dict()
        for key in ("algorithm", "run_dir", "paced_offline_n"):
            rest.pop(key, None)
        assert rest == (shared := shared or rest), method
    assert configs[("drift", "miniature")].algorithm.warmup_steps == 3
    assert (shared["total_steps"], shared["optim"]["warmup_steps"]) == (60, 3)
    assert shared["task"]["name"] == "miniature"
    assert shared["model"]["path"] == "assets/miniature_base"
