"""RoPE variants: plain, YaRN and Llama 3 scaling; their inverse frequencies and HF dict form.

`Rope` is what one layer applies (base theta and an optional scaling); `ModelConfig` holds
one for its full-attention layers and, where it differs, one for its sliding-window layers.
`ropes_from_hf` reads both from a Hugging Face config.json, legacy keys and transformers-5
`rope_parameters` alike; each variant's `to_hf_dict` writes it back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


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


def ropes_from_hf(d: dict[str, Any], model_type: str) -> tuple[Rope, Rope | None]:
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
        full = _rope_from_hf(params.get("full_attention", {}), theta, max_pos)
        sliding = _rope_from_hf(params.get("sliding_attention", {}), theta, max_pos)
        return full, None if sliding == full else sliding
    full = _rope_from_hf(params or {}, theta, max_pos)
    if model_type == "olmo3" and full.scaling is not None:
        return full, Rope(full.theta)
    return full, None


def _rope_from_hf(p: dict[str, Any], theta: Any, max_pos: int) -> Rope:
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
