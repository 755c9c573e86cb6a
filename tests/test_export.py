"""scripts/export.py: a run's checkpoint -> HF folder (transformers) and PEFT adapter (peft);
scripts/eval.py on a run folder."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from jaxsd.models import from_pretrained
from jaxsd.models.lora import trainable_filter
from jaxsd.train import run_config
from jaxsd.train.checkpoint import Checkpointer
from jaxsd.train.mesh import make_mesh
from jaxsd.train.settings import lora_config
from jaxsd.train.state import train_state_from_model
from tests.test_loop import load_config

IDS = np.array([[1, 5, 9, 200, 3, 4, 7, 11], [8, 2, 6, 100, 13, 17, 19, 23]])


def _saved_run(tmp_path, model_dir, *, rank: int, step: int = 7):
    """A run folder whose checkpoint `step` holds randomly moved trained params (as training
    would leave them) and the model they define; no train step is compiled."""
    cfg = load_config("sdpo", "smoke")
    cfg.model.path, cfg.run_dir = str(model_dir), str(tmp_path / "run")
    cfg.model.lora.update(rank=rank, alpha=8.0, targets="q,v,down")
    lora = lora_config(cfg)
    model, _ = from_pretrained(model_dir, lora=lora, seed=cfg.seed)
    key = jax.random.key(1)
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, trainable_filter(lora)))):
        noise = jax.random.normal(jax.random.fold_in(key, i), var.shape, var.dtype)
        var.set_value(var[...] + 0.05 * noise)
    _, state, _ = train_state_from_model(
        model, optax.sgd(0.1), mesh=make_mesh((1, 1, 1)), trainable=trainable_filter(lora)
    )
    cfg = run_config.prepare_run_dir(cfg)
    host = {"algorithm": {}, "step": step, "config": run_config.config_dict(cfg)}
    with Checkpointer(cfg.run_dir) as ckpt:
        ckpt.save(step, state, host)
        ckpt.wait()
    return cfg, model


def _ours(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(IDS)), np.float32)


def _torch_logits(hf_model) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(IDS)).logits.float().numpy()


def test_export_full_run_loads_in_transformers_with_our_logits(
    tmp_path, tiny_model_dir, repo_module
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, model = _saved_run(tmp_path, tiny_model_dir, rank=0)
    export_main = repo_module("scripts/export.py").main

    result = export_main([cfg.run_dir, "--out", str(tmp_path / "hf")])
    assert result["step"] == 7 and "peft_adapter" not in result
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ref = _torch_logits(hf)
    np.testing.assert_allclose(ref, _ours(model), atol=1e-4, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert np.abs(_torch_logits(base) - ref).max() > 1e-2  # the checkpoint, not the base
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.chat_template and tok.apply_chat_template([{"role": "user", "content": "1+1"}])
    with pytest.raises(FileNotFoundError, match=r"saved steps: \[7\]"):
        export_main([cfg.run_dir, "--out", str(tmp_path / "x"), "--step", "3"])


def test_export_lora_run_merged_folder_and_peft_adapter_give_our_logits(
    tmp_path, tiny_model_dir, repo_module
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, model = _saved_run(tmp_path, tiny_model_dir, rank=4)
    result = repo_module("scripts/export.py").main([cfg.run_dir, "--out", str(tmp_path / "hf")])
    ours = _ours(model)
    merged = AutoModelForCausalLM.from_pretrained(result["hf_folder"], dtype=torch.float32)
    np.testing.assert_allclose(_torch_logits(merged), ours, atol=1e-4, rtol=0)

    adapter_cfg = json.loads((tmp_path / "hf" / "lora_adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8.0
    assert adapter_cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_logits = _torch_logits(base)
    peft_model = PeftModel.from_pretrained(base, result["peft_adapter"])
    peft_logits = _torch_logits(peft_model)
    np.testing.assert_allclose(peft_logits, ours, atol=1e-4, rtol=0)
    assert np.abs(peft_logits - base_logits).max() > 1e-2  # the adapters do act


def test_eval_accepts_a_run_folder_and_task_kwargs(tmp_path, tiny_model_dir, repo_module):
    cfg, _ = _saved_run(tmp_path, tiny_model_dir, rank=0)
    eval_main = repo_module("scripts/eval.py").main
    repo_module("scripts/export.py").main([cfg.run_dir, "--out", str(tmp_path / "hf")])
    kwargs = {"digits": 1, "train_size": 20, "test_size": 3}
    common = ["--task", "arithmetic", "--task_kwargs", json.dumps(kwargs),
              "--n", "2", "--max_new_tokens", "6", "--seed", "5", "--keep_responses"]  # fmt: skip
    texts = lambda result: [r["responses"] for r in result["per_record"]]  # noqa: E731
    from_run = eval_main(["--model", cfg.run_dir, *common])
    from_hf = eval_main(["--model", str(tmp_path / "hf"), *common])
    from_base = eval_main(["--model", str(tiny_model_dir), *common])
    assert from_run["report"]["model"] == f"{cfg.run_dir}@step7"
    assert from_run["report"]["num_prompts"] == 3  # test_size=3 reached the task
    assert from_run["report"]["task_kwargs"] == kwargs
    assert texts(from_run) == texts(from_hf) != texts(from_base)
