"""Flax NNX decoder models (Qwen3 + Llama/Qwen2/OLMo-3 switches), HF I/O, LoRA, sharding."""

from jaxsd.models.config import ModelConfig
from jaxsd.models.io import (
    from_pretrained,
    load_hf_state_dict,
    read_config,
    save_pretrained,
    to_hf_state_dict,
)
from jaxsd.models.lora import LoraConfig, lora_disabled, merge_lora, set_lora_enabled
from jaxsd.models.qwen3 import Transformer
from jaxsd.models.sharding import DEFAULT_RULES, logical_to_mesh_spec, param_shardings

__all__ = [
    "DEFAULT_RULES",
    "LoraConfig",
    "ModelConfig",
    "Transformer",
    "from_pretrained",
    "load_hf_state_dict",
    "logical_to_mesh_spec",
    "lora_disabled",
    "merge_lora",
    "param_shardings",
    "read_config",
    "save_pretrained",
    "set_lora_enabled",
    "to_hf_state_dict",
]
