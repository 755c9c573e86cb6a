"""Export a run's checkpoint as a Hugging Face folder (and a PEFT adapter for LoRA runs).

    python scripts/export.py runs/sc_sdpo_default_1a2b3c4d --out exported/ [--step 40]

The HF folder (config.json, safetensors, tokenizer, chat template, generation config) is what
transformers' `from_pretrained` and vLLM load; it is written by `jaxsd.models.io.save_pretrained`
(LoRA adapters merged as W + (alpha / r) A B). A LoRA run also gets `<out>/lora_adapter`, a PEFT
folder (adapter_config.json + adapter_model.safetensors) over the run's base model.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jaxsd.models import from_pretrained, save_pretrained
from jaxsd.models.io import hf_name
from jaxsd.models.lora import LoraConfig, trainable_filter

ADAPTER_DIR = "lora_adapter"
# Our projection names -> the HF module names PEFT targets.
_PEFT_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                 "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}  # fmt: skip


def checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
    """Saved steps of a run folder, ascending ([] when it has none)."""
    folder = pathlib.Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


def is_run_dir(path: str | os.PathLike) -> bool:
    """A jaxsd run folder (checkpoints/<step>) rather than an HF model folder."""
    return bool(checkpoint_steps(path))


def run_config(run_dir: str | os.PathLike, step: int) -> ml_collections.ConfigDict:
    """The run's config: `config.json`, else the copy every checkpoint's host state holds."""
    path = pathlib.Path(run_dir) / "config.json"
    if not path.is_file():
        path = pathlib.Path(run_dir) / "checkpoints" / str(step) / "host" / "metadata"
        return ml_collections.ConfigDict(json.loads(path.read_text())["config"])
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _pick_step(run_dir: str | os.PathLike, step: int | None) -> int:
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"{run_dir} has no checkpoints/<step>; is it a jaxsd run folder?")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"--step {step} is not saved in {run_dir}; saved steps: {steps}")
    return step


def load_run_model(run_dir: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The policy of checkpoint `step` (default: latest) as a `Transformer` with its adapters.

    Returns {"model", "config" (ModelConfig), "cfg" (run config), "step", "model_dir",
    "lora"}. Only the trained params are read from the checkpoint; the frozen rest (LoRA base
    weights) comes from the run's base model folder, exactly as training built it.
    """
    import orbax.checkpoint as ocp

    from jaxsd.train.build import resolve_model_dir
    from jaxsd.train.settings import lora_config, model_settings

    step = _pick_step(run_dir, step)
    cfg = run_config(run_dir, step)
    cfg.run_dir = os.fspath(run_dir)  # a tiny on-the-fly base model lives in the run folder
    model_dir = resolve_model_dir(model_settings(cfg), cfg.run_dir)
    lora = lora_config(cfg)
    model, config = from_pretrained(
        model_dir, dtype=jnp.dtype(cfg.model.param_dtype), lora=lora, seed=cfg.seed
    )
    folder = (pathlib.Path(run_dir) / "checkpoints" / str(step) / "state").resolve()
    restored = ocp.StandardCheckpointer().restore(folder)
    params = nnx.state(model, trainable_filter(lora))
    saved = restored["params"]
    # Orbax stores each nnx.Variable as {"value": array}.
    flat_saved = {tuple(str(k) for k in p[:-1]): v for p, v in _flat_dict(saved)}
    for path, var in nnx.to_flat_state(params):
        key = tuple(str(k) for k in path)
        if key not in flat_saved:
            raise KeyError(f"checkpoint {folder} has no parameter {'.'.join(key)}")
        value = np.asarray(flat_saved[key])
        if value.shape != var.shape:
            raise ValueError(f"{'.'.join(key)}: checkpoint {value.shape} vs model {var.shape}")
        var.set_value(jnp.asarray(value, var.dtype))
    return {"model": model, "config": config, "cfg": cfg, "step": step,
            "model_dir": model_dir, "lora": lora}  # fmt: skip


def _flat_dict(tree: Any, prefix: tuple = ()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat_dict(v, prefix + (k,))
    else:
        yield prefix, tree


def peft_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """PEFT tensor names and layouts of the adapters: A [r, in], B [out, r] (ours: A [in, r],
    B [r, out], so y = x W + s (x A) B = x W^T_hf + s x A_peft^T B_peft^T)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        leaf = {"lora_a": "lora_A", "lora_b": "lora_B"}[path[-1]]
        module = hf_name(path[:-1] + ("kernel",)).removesuffix(".weight")
        out[f"base_model.model.{module}.{leaf}.weight"] = np.ascontiguousarray(
            np.asarray(jax.device_get(var[...]), np.float32).T
        )
    return out


def save_peft_adapter(
    model: nnx.Module, lora: LoraConfig, base_model: str | os.PathLike, out: str | os.PathLike
) -> pathlib.Path:
    """Write a PEFT LoRA folder `peft.PeftModel.from_pretrained(base, out)` loads."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": os.path.abspath(base_model),
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "target_modules": sorted(_PEFT_MODULES[t] for t in lora.targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    save_file(peft_state_dict(model), out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Write checkpoint `step` of `run_dir` as an HF folder `out` (+ `out/lora_adapter`)."""
    loaded = load_run_model(run_dir, step)
    model, model_dir = loaded["model"], loaded["model_dir"]
    out = save_pretrained(model, loaded["config"], out, dtype=dtype, tokenizer_dir=model_dir)
    result = {
        "hf_folder": os.fspath(out),
        "step": loaded["step"],
        "base_model": os.path.abspath(model_dir),
    }
    if loaded["lora"] is not None:
        adapter = save_peft_adapter(model, loaded["lora"], model_dir, out / ADAPTER_DIR)
        result["peft_adapter"] = os.fspath(adapter)
    return result
