"""End to end: every method config trains 3 smoke steps; resume after SIGKILL is exact."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxsd.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("sc_sdpo", "sdpo", "grpo", "grpo_no_norm", "paced", "hard_filter", "srpo", "ssopd",
           "drift")  # fmt: skip


def load_config(method: str, preset: str = "smoke"):
    spec = importlib.util.spec_from_file_location(
        f"cfg_{method}", REPO / "configs" / f"{method}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


@pytest.mark.parametrize("method", METHODS)
def test_every_config_runs_three_smoke_steps(method, tmp_path):
    from jaxsd.train.loop import train

    cfg = load_config(method)
    cfg.run_dir = str(tmp_path / method)
    summary = train(cfg)

    rows = [r for r in read_metrics(cfg.run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert np.isfinite(row["loss"]) and np.isfinite(row["grad_norm"])
        assert 0.0 <= row["rollout/pass_rate"] <= 1.0
    # The step's loss terms are exactly the ones the method switches on.
    terms = {k.split("/", 1)[1] for k in rows[0] if k.startswith("loss/")}
    switches = summary["step_switches"]
    assert ("distill" in terms) == switches["use_distillation"], terms
    assert ("pg" in terms) == switches["use_surrogate"], terms
    assert ("ssopd" in terms) == switches["use_ssopd"], terms
    assert summary["end_step"] == 3 and "eval_end" in summary
    assert (pathlib.Path(cfg.run_dir) / "checkpoints" / "3").is_dir()
    assert pathlib.Path(summary["plot"]).stat().st_size > 0
    # The evaluation at step 3 logged sample completions of that step's rollouts.
    samples = (pathlib.Path(cfg.run_dir) / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in samples] == [3] * cfg.task.questions_per_step


def _train_cli(run_dir: pathlib.Path, steps: int, *, kill_at: int | None = None, extra=()):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if kill_at is not None:
        env["JAXSD_FAULT_KILL_AT_STEP"] = str(kill_at)
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"),
           f"--config={REPO / 'configs' / 'drift.py'}:smoke", f"--config.run_dir={run_dir}",
           f"--config.total_steps={steps}", "--config.checkpoint_every=1",
           "--config.eval_every=0", *extra]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def load_checkpoint(run_dir: pathlib.Path, step: int) -> tuple[dict[str, np.ndarray], dict]:
    """Flat {path: array} of a saved train state and its host state, read back with Orbax."""
    import jax
    import orbax.checkpoint as ocp

    folder = run_dir / "checkpoints" / str(step)
    state = ocp.StandardCheckpointer().restore((folder / "state").resolve())
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    arrays = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}
    return arrays, json.loads((folder / "host" / "metadata").read_text())


@pytest.mark.parametrize("async_steps", [0, 1])
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, async_steps):
    """DRIFT (stateful host side): 6 steps straight vs 3 + SIGKILL mid-step-4 + resume, on-policy
    and with rollouts sampled one step ahead (the checkpoint keeps the batch sampled ahead)."""
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    extra = (f"--config.rollout.async_steps={async_steps}",)
    done = _train_cli(straight, 6, extra=extra)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = _train_cli(crashed, 6, kill_at=4, extra=extra)
    assert killed.returncode == -9, killed.stderr[-3000:]
    _, host_2 = load_checkpoint(crashed, 2)  # the batch of step 3, sampled during step 2
    assert (host_2["ahead"] is not None) == bool(async_steps)
    resumed = _train_cli(crashed, 6, extra=extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr

    def by_step(run_dir):
        return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}

    a, b = by_step(straight), by_step(crashed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    # async: step 1 samples with weights 0, every later step with the previous step's weights
    assert [a[s]["rollout/staleness"] for s in a] == [0.0] + [float(async_steps)] * 5
    for step in (4, 5, 6):
        for key, value in a[step].items():
            if key.startswith(("time", "perf/rollout_tokens", "perf/tokens_per_s", "mem/")):
                continue
            assert b[step][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)

    state_a, host_a = load_checkpoint(straight, 6)
    state_b, host_b = load_checkpoint(crashed, 6)
    assert host_a["algorithm"] == host_b["algorithm"]  # DRIFT's EMA rates and success buffer
    assert json.loads(host_a["algorithm"])["ema_pass_rates"]  # non-trivial state survived
    assert state_a.keys() == state_b.keys()
    for name in state_a:  # params, EMA teacher, Adam moments, step, RNG
        np.testing.assert_allclose(state_b[name], state_a[name], rtol=0, atol=1e-6, err_msg=name)


def test_model_runtime_keys_reach_the_trained_and_sampling_models(tmp_path):
    """config.model.compute_dtype / remat / attention are what the step and engine run with."""
    from flax import nnx

    from jaxsd.train.build import build

    cfg = load_config("sdpo")
    cfg.run_dir = str(tmp_path / "run")
    cfg.model.compute_dtype = "bfloat16"
    cfg.model.remat = True
    cfg.model.attention = "xla"
    run = build(cfg)
    trained = nnx.merge(run.learner.graphdef, run.learner.state.params).config
    assert (trained.compute_dtype, trained.remat, trained.attention) == ("bfloat16", True, "xla")
    engine_model = run.worker.engine.model
    assert (trained.param_dtype, engine_model.config.compute_dtype) == ("float32", "bfloat16")
    run.close()


def test_a_bf16_remat_xla_attention_run_trains(tmp_path):
    from jaxsd.train.loop import train

    cfg = load_config("sdpo")
    cfg.run_dir = str(tmp_path / "run")
    cfg.total_steps = 2
    cfg.model.compute_dtype = "bfloat16"
    cfg.model.remat = True
    cfg.model.attention = "xla"
    train(cfg)
    rows = [r for r in read_metrics(cfg.run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("attention", "flash", "model.attention"),
        ("compute_dtype", "fp8", "model.compute_dtype"),
        ("param_dtype", "int8", "model.param_dtype"),
    ],
)
def test_bad_model_keys_are_named(key, value, message):
    from jaxsd.train.validate import validate_config

    cfg = load_config("sdpo")
    cfg.model[key] = value
    with pytest.raises(ValueError, match=message):
        validate_config(cfg)


def test_cudnn_attention_needs_bf16_compute():
    from jaxsd.train.validate import validate_config

    cfg = load_config("sdpo")
    cfg.model.attention = "cudnn"
    with pytest.raises(ValueError, match="compute_dtype 'bfloat16'"):
        validate_config(cfg)
    cfg.model.compute_dtype = "bfloat16"
    validate_config(cfg)


def test_config_validation_knows_the_models_dtypes():
    from jaxsd.models import config
    from jaxsd.train import validate

    assert set(validate.MODEL_DTYPES) == set(config._DTYPES)


def test_loss_topk_block_reaches_the_step_and_is_validated():
    from jaxsd import algorithms
    from jaxsd.train.settings import step_config
    from jaxsd.train.validate import validate_config

    cfg = load_config("sdpo")
    switches = algorithms.from_config(cfg.algorithm).step_switches()
    assert step_config(cfg, switches).topk_block is None
    cfg.loss.topk_block = 4096
    validate_config(cfg)
    assert step_config(cfg, switches).topk_block == 4096
    cfg.loss.topk_block = 0
    with pytest.raises(ValueError, match="loss.topk_block"):
        validate_config(cfg)


def _flat(state) -> dict[str, np.ndarray]:
    from flax import nnx

    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


def test_lora_run_trains_only_adapters_and_serves_the_merged_weights(tmp_path):
    """model.lora.rank > 0 with SSOPD (fixed teacher = the base, adapters off, METHODS §1):
    two steps leave every base weight bit-identical and move only the adapters; the engine
    serves W + (alpha / r) A B (numpy), also after a resume from the checkpoint."""
    from jaxsd.train.build import build
    from jaxsd.train.checkpoint import Checkpointer
    from jaxsd.train.loop import start_or_resume, train_one_step
    from jaxsd.train.rollout_worker import PublishedWeights

    cfg = load_config("ssopd")
    cfg.run_dir = str(tmp_path / "run")
    cfg.model.lora.update(rank=4, alpha=8.0, targets="q, v,up")
    run = build(cfg)
    run.worker.update_weights(run.learner.state, 0)
    base_before = _flat(run.learner.state.frozen)
    assert set(_flat(run.learner.state.params)) == {
        f"layers/{i}/{m}/{p}_proj/lora_{ab}"
        for i in range(run.worker.engine.model.config.num_layers)
        for m, p in (("self_attn", "q"), ("self_attn", "v"), ("mlp", "up"))
        for ab in "ab"
    }
    grad_norms = [train_one_step(run, step)["grad_norm"] for step in range(2)]
    assert min(grad_norms) > 0

    adapters, base = _flat(run.learner.state.params), _flat(run.learner.state.frozen)
    assert base.keys() == base_before.keys()
    for name, value in base.items():
        np.testing.assert_array_equal(value, base_before[name], err_msg=name)
    assert all(np.abs(v).max() > 0 for k, v in adapters.items() if k.endswith("lora_b"))
    teacher = _flat(run.learner.state.teacher)  # fixed teacher: the base, i.e. zero adapters
    assert all(not v.any() for v in teacher.values())

    def expected_engine_weights():
        out = {k: v for k, v in base.items() if k.endswith(("kernel", "weight", "embed_tokens"))}
        for name in (k[: -len("/lora_a")] for k in adapters if k.endswith("/lora_a")):
            a, b = adapters[f"{name}/lora_a"], adapters[f"{name}/lora_b"]
            out[f"{name}/kernel"] = base[f"{name}/kernel"] + (8.0 / 4) * a @ b
        return out

    def check_engine(engine_model):
        from flax import nnx

        served = _flat(nnx.state(engine_model, nnx.Param))
        want = expected_engine_weights()
        assert served.keys() == want.keys()
        for name, value in want.items():
            np.testing.assert_allclose(served[name], value, rtol=1e-6, atol=1e-7, err_msg=name)

    check_engine(run.worker.engine.model)  # the embedded engine serves the trainer's copy, merged

    class RecordingSync:  # the vLLM path: what would be published to the weights folder
        def should_publish(self, step):
            return True

        def after_step(self, step, hf_state_dict):
            self.published = (step, hf_state_dict())

    sync = RecordingSync()
    vllm_path = PublishedWeights(run.worker.engine.model, sync, run.worker.weights.engine_params)
    vllm_path.serve(vllm_path.snapshot(run.learner.state, 2), 2)
    step, tensors = sync.published
    want = expected_engine_weights()
    assert step == 2
    np.testing.assert_allclose(
        tensors["model.layers.0.self_attn.q_proj.weight"],
        want["layers/0/self_attn/q_proj/kernel"].T,
        rtol=1e-6,
        atol=1e-7,
    )
    np.testing.assert_array_equal(
        tensors["model.layers.0.self_attn.k_proj.weight"],
        base["layers/0/self_attn/k_proj/kernel"].T,
    )
    with Checkpointer(cfg.run_dir) as checkpointer:
        checkpointer.save(2, run.learner.state, run.host_state_json(2))
    run.close()
    cfg.resume = True
    resumed = build(cfg)
    with Checkpointer(cfg.run_dir) as checkpointer:
        assert start_or_resume(resumed, checkpointer) == 2
    check_engine(resumed.worker.engine.model)
    resumed.close()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("rank", -1, "model.lora.rank"),
        ("alpha", 0.0, "model.lora.alpha"),
        ("targets", "q,gate_proj", "model.lora.targets"),
        ("targets", " , ", "model.lora.targets"),
    ],
)
def test_bad_lora_keys_are_named(key, value, message):
    from jaxsd.train.validate import validate_config

    cfg = load_config("ssopd")
    cfg.model.lora[key] = value
    with pytest.raises(ValueError, match=message):
        validate_config(cfg)
