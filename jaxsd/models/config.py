"""Model configuration: one dataclass for Qwen3, Qwen2, Llama and OLMo-3 decoders.

The families differ only in switches (q/k-norm and its scope, norm placement, biases,
sliding-window layers), so one `Transformer` serves them all.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

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


def _default_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """Plain RoPE's [head_dim / 2] float32 inverse frequencies, theta^(-2i / head_dim)."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))


@dataclasses.dataclass(frozen=True)
class YarnRope:
    """YaRN RoPE scaling (Peng et al. 2023, arXiv:2309.00071), as transformers computes it.

    Frequencies that turn fewer than `beta_slow` times over the original context are divided
    by `factor` (interpolated), those that turn more than `beta_fast` times are kept
    (extrapolated), with a linear ramp between; cos and sin are scaled by `attention_scale()`.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if not self.factor > 0 or not self.original_max_position_embeddings > 0:
            raise ValueError(
                f"yarn rope scaling needs factor > 0 and original_max_position_embeddings > 0, "
                f"got {self.factor} and {self.original_max_position_embeddings}"
            )

    def attention_scale(self) -> float:
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim)
        return mscale(self.factor)

    def inv_freq(self, head_dim: int, theta: float) -> np.ndarray:
        """[head_dim / 2] float32 inverse frequencies."""
        d = head_dim
        inv_freq = _default_inv_freq(d, theta)

        def dim_of(rotations: float) -> float:  # the dimension turning `rotations` times
            turns = self.original_max_position_embeddings / (rotations * 2 * math.pi)
            return d * math.log(turns) / (2 * math.log(theta))

        low, high = dim_of(self.beta_fast), dim_of(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001  # a step instead of a ramp, without dividing by zero
        ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
        keep = 1.0 - ramp  # weight of the original (extrapolated) frequency
        out = (inv_freq / self.factor) * (1.0 - keep) + inv_freq * keep
        return out.astype(np.float32)

    def to_hf_dict(self) -> dict[str, Any]:
        d = {"rope_type": "yarn", **dataclasses.asdict(self)}
        return {k: v for k, v in d.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class Llama3Rope:
    """Llama 3.1's RoPE scaling: wavelengths longer than `original / low_freq_factor` are
    stretched by `factor`, those shorter than `original / high_freq_factor` kept, and the
    ones between blended smoothly (transformers' `llama3` rope type)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if not (self.factor > 0 and self.high_freq_factor > self.low_freq_factor > 0):
            raise ValueError(
                "llama3 rope scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0"
            )

    def attention_scale(self) -> float:
        return 1.0

    def inv_freq(self, head_dim: int, theta: float) -> np.ndarray:
        inv_freq = _default_inv_freq(head_dim, theta)
        wavelen = 2 * math.pi / inv_freq
        original = self.original_max_position_embeddings
        stretched = np.where(
            wavelen > original / self.low_freq_factor, inv_freq / self.factor, inv_freq
        )
        smooth = (original / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        blended = (1 - smooth) * stretched / self.factor + smooth * stretched
        medium = (wavelen >= original / self.high_freq_factor) & (
            wavelen <= original / self.low_freq_factor
        )
        return np.where(medium, blended, stretched).astype(np.float32)

    def to_hf_dict(self) -> dict[str, Any]:
        return {"rope_type": "llama3", **dataclasses.asdict(self)}


RopeScaling = YarnRope | Llama3Rope


@dataclasses.dataclass(frozen=True)
class Rope:
    """One RoPE variant: base `theta` and an optional frequency scaling (YaRN, Llama 3)."""

    theta: float
    scaling: RopeScaling | None = None

    def to_hf_dict(self) -> dict[str, Any]:
        base = {"rope_type": "default"} if self.scaling is None else self.scaling.to_hf_dict()
        return {**base, "rope_theta": self.theta}


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
        full_rope, sliding_rope = _ropes(d, model_type)
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


def _ropes(d: dict[str, Any], model_type: str) -> tuple[Rope, Rope | None]:
    """(RoPE of full-attention layers, RoPE of sliding-window layers or None = the same).

    Reads the legacy `rope_theta` + `rope_scaling` keys and transformers-5 `rope_parameters`
    (flat, or one entry per layer type as OLMo-3 writes it). OLMo-3 applies a flat
    `rope_scaling` to its full-attention layers only, as transformers does.
    """
    theta = d.get("rope_theta")
    params = d.get("rope_parameters") or d.get("rope_scaling")
    max_pos = d.get("max_position_embeddings", 40960)
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        unknown = set(params) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"rope_parameters for unknown layer types {sorted(unknown)}")
        full = _rope(params.get("full_attention", {}), theta, max_pos)
        sliding = _rope(params.get("sliding_attention", {}), theta, max_pos)
        return full, None if sliding == full else sliding
    full = _rope(params or {}, theta, max_pos)
    if model_type == "olmo3" and full.scaling is not None:
        return full, Rope(full.theta)
    return full, None


def _rope(p: dict[str, Any], theta: Any, max_pos: int) -> Rope:
    """One layer type's RoPE from its HF dict; `theta`: the top-level rope_theta fallback."""
    theta = p.get("rope_theta", theta)
    if theta is None:
        raise ValueError("config.json has neither rope_theta nor rope_parameters.rope_theta")
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported (RoPE on every dimension)")
    rope_type = p.get("rope_type", p.get("type", "default"))
    if rope_type == "default":
        return Rope(float(theta))
    if rope_type == "llama3":
        return Rope(
            float(theta),
            Llama3Rope(
                factor=float(p["factor"]),
                low_freq_factor=float(p["low_freq_factor"]),
                high_freq_factor=float(p["high_freq_factor"]),
                original_max_position_embeddings=int(p["original_max_position_embeddings"]),
            ),
        )
    if rope_type != "yarn":
        raise ValueError(
            f"rope scaling {rope_type!r} is not supported (default, 'yarn' and 'llama3' are); "
            "remove rope_scaling from config.json or use a model without it"
        )
    original = p.get("original_max_position_embeddings") or max_pos
    yarn = YarnRope(
        factor=float(p.get("factor") or max_pos / original),
        original_max_position_embeddings=int(original),
        beta_fast=float(p.get("beta_fast") or 32.0),
        beta_slow=float(p.get("beta_slow") or 1.0),
        attention_factor=p.get("attention_factor"),
        mscale=p.get("mscale"),
        mscale_all_dim=p.get("mscale_all_dim"),
        truncate=bool(p.get("truncate", True)),
    )
    return Rope(float(theta), yarn)
