"""Model configuration: one dataclass for Qwen3, Qwen2, Llama and OLMo-3 decoders.

The families differ only in switches (q/k-norm and its scope, norm placement, biases,
sliding-window layers), so one `Transformer` serves them all. `ModelConfig.from_hf_dict` and
`to_hf_dict` read and write a Hugging Face config.json; the RoPE variants are in `rope`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

# The RoPE variants live in `rope`; YarnRope and Llama3Rope stay importable from here.
from jaxsd.models.rope import Llama3Rope, Rope, RopeScaling, YarnRope, ropes_from_hf

__all__ = [
    "ATTENTION_IMPLS",
    "SUPPORTED_MODEL_TYPES",
    "Llama3Rope",
    "ModelConfig",
    "Rope",
    "RopeScaling",
    "YarnRope",
    "dtype_from_name",
    "dtype_name",
]

# model_type -> (architectures entry, family switches). Anything else is rejected on load.
_FAMILIES: dict[str, dict[str, Any]] = {
    "qwen3": dict(
        arch="Qwen3ForCausalLM", qk_norm=True, qk_norm_scope="head", norm_placement="pre"
    ),
    "qwen2": dict(
        arch="Qwen2ForCausalLM", qk_norm=False, qk_norm_scope="head", norm_placement="pre"
    ),
    "llama": dict(
        arch="LlamaForCausalLM", qk_norm=False, qk_norm_scope="head", norm_placement="pre"
    ),
    "olmo3": dict(
        arch="Olmo3ForCausalLM", qk_norm=True, qk_norm_scope="full", norm_placement="post"
    ),
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)
ATTENTION_IMPLS = ("jaxsd", "xla", "cudnn")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str) -> jnp.dtype:
    """Map a dtype name ("float32", "bfloat16", "float16") to a JAX dtype."""
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(_DTYPES)}")
    return jnp.dtype(_DTYPES[name])


def dtype_name(dtype: Any) -> str:
    """Inverse of `dtype_from_name` for jnp/np dtypes or names."""
    name = jnp.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(_DTYPES)}")
    return name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder hyper-parameters; field names follow transformers' `Qwen3Config`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = False
    qk_norm: bool = True  # Qwen3 / OLMo-3; False = Llama family
    norm_placement: str = "pre"  # "post" = OLMo-3 (norm after attention / MLP, before residual)
    max_position_embeddings: int = 40960
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    # Additions beyond the contract (all defaulted, Qwen3 values).
    model_type: str = "qwen3"
    qk_norm_scope: str = "head"  # "head": RMSNorm over head_dim (Qwen3); "full": over N*D (OLMo)
    qkv_bias: bool = False  # Qwen2 has q/k/v biases
    o_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer "full_attention" | "sliding_attention"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    rope_scaling: RopeScaling | None = None  # of the (full-attention) layers' RoPE
    # RoPE of the sliding-window layers when it differs (OLMo-3: YaRN on full attention only).
    sliding_rope: Rope | None = None
    # Runtime switches (not part of config.json).
    # "jaxsd": our attention with a hand-written backward (any mask, any backend);
    # "xla" / "cudnn": jax.nn.dot_product_attention with that implementation (cudnn = fused
    # flash attention on NVIDIA GPUs, bf16/fp16 compute only).
    attention: str = "jaxsd"
    remat: bool = False  # recompute each decoder layer's activations in the backward pass

    def __post_init__(self) -> None:
        if self.model_type not in _FAMILIES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; "
                f"use one of {SUPPORTED_MODEL_TYPES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.norm_placement not in ("pre", "post"):
            raise ValueError(f"norm_placement={self.norm_placement!r}; use 'pre' or 'post'")
        if self.qk_norm_scope not in ("head", "full"):
            raise ValueError(f"qk_norm_scope={self.qk_norm_scope!r}; use 'head' or 'full'")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(
                    f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
                )
            bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if bad:
                raise ValueError(f"unknown layer_types {sorted(bad)}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("layer_types has sliding_attention but sliding_window is unset")
        dtype_from_name(self.param_dtype)
        dtype_from_name(self.compute_dtype)
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={self.attention!r}; use one of {ATTENTION_IMPLS}")
        if self.attention == "cudnn" and self.compute_dtype == "float32":
            raise ValueError(
                "attention='cudnn' needs compute_dtype 'bfloat16' or 'float16' (cuDNN flash "
                "attention has no fp32 kernel); use attention='jaxsd' for fp32"
            )

    @property
    def param_jnp_dtype(self) -> jnp.dtype:
        return dtype_from_name(self.param_dtype)

    @property
    def compute_jnp_dtype(self) -> jnp.dtype:
        return dtype_from_name(self.compute_dtype)

    def layer_window(self, layer: int) -> int | None:
        """Sliding window of `layer` (None = full causal attention)."""
        if self.layer_types is None or self.layer_types[layer] == "full_attention":
            return None
        return self.sliding_window

    def layer_rope(self, layer: int) -> Rope:
        """The RoPE `layer` applies (sliding-window layers may have their own)."""
        if self.sliding_rope is not None and self.layer_window(layer) is not None:
            return self.sliding_rope
        return Rope(self.rope_theta, self.rope_scaling)

    def num_params(self) -> int:
        """Number of base (non-LoRA) parameters, counting a tied embedding once."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * q + 2 * h * kv + q * h
        attn += (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        if self.qk_norm:
            attn += 2 * d if self.qk_norm_scope == "head" else q + kv
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config.json dict (qwen3 / qwen2 / llama / olmo3)."""
        model_type = d.get("model_type")
        if model_type not in _FAMILIES:
            raise ValueError(
                f"unknown architecture: model_type={model_type!r} (architectures="
                f"{d.get('architectures')}); supported model types are {SUPPORTED_MODEL_TYPES}"
            )
        fam = _FAMILIES[model_type]
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported (only 'silu')")
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        heads = d["num_attention_heads"]
        attention_bias = bool(d.get("attention_bias", False))
        dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
        sliding = d.get("sliding_window") if d.get("use_sliding_window", True) else None
        layer_types = d.get("layer_types")
        if layer_types is not None and "sliding_attention" not in layer_types:
            layer_types, sliding = None, None
        if layer_types is None:
            sliding = None  # Qwen2/3 ship sliding_window but only use it with layer_types
        eos = d.get("eos_token_id")
        full_rope, sliding_rope = ropes_from_hf(d, model_type)
        if layer_types is None:
            sliding_rope = None  # no sliding-window layer to apply it to
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=full_rope.theta,
            rope_scaling=full_rope.scaling,
            sliding_rope=sliding_rope,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qk_norm=fam["qk_norm"],
            norm_placement=fam["norm_placement"],
            max_position_embeddings=d.get("max_position_embeddings", 40960),
            param_dtype=dtype if dtype in _DTYPES else "float32",
            compute_dtype="float32",
            model_type=model_type,
            qk_norm_scope=fam["qk_norm_scope"],
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            sliding_window=sliding,
            layer_types=tuple(layer_types) if layer_types is not None else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """Hugging Face config.json dict that transformers and vLLM load."""
        fam = _FAMILIES[self.model_type]
        d: dict[str, Any] = {
            "architectures": [fam["arch"]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": self.param_dtype,
            "dtype": self.param_dtype,
            "attention_dropout": 0.0,
            "use_cache": True,
        }
        full = Rope(self.rope_theta, self.rope_scaling)
        if self.model_type != "olmo3":
            if self.sliding_rope is not None:
                raise ValueError(f"{self.model_type} has one RoPE for all layers (sliding_rope)")
            d["rope_parameters"] = full.to_hf_dict()
        elif self.rope_scaling is not None or self.sliding_rope is not None:
            sliding = self.sliding_rope or full
            d["rope_parameters"] = {
                "full_attention": full.to_hf_dict(),
                "sliding_attention": sliding.to_hf_dict(),
            }
        if self.model_type in ("qwen3", "llama", "olmo3"):
            if self.qkv_bias != self.o_bias:
                raise ValueError(f"{self.model_type} needs qkv_bias == o_bias (attention_bias)")
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "qwen2" and not (self.qkv_bias and not self.o_bias):
            raise ValueError("qwen2 checkpoints have q/k/v biases and no o_proj bias")
        if self.layer_types is not None:
            d["layer_types"] = list(self.layer_types)
            d["sliding_window"] = self.sliding_window
            if self.model_type in ("qwen2", "qwen3"):
                d["use_sliding_window"] = True
        elif self.model_type in ("qwen2", "qwen3"):
            d["use_sliding_window"] = False
            d["sliding_window"] = None
        elif self.model_type == "olmo3":
            d["layer_types"] = ["full_attention"] * self.num_layers
            d["sliding_window"] = 4096
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            eos = self.eos_token_id
            d["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
        return d
