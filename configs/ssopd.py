"""SSOPD (METHODS §5-§6): GRPO + frontier-weighted clipped forward KL, fixed teacher.

The qwen3_8b preset follows the SSOPD paper (Tan & Hong 2026, arXiv 2605.17497) where it can:
math training data (MATH train + AIME 1983-2023; the paper's OpenThoughts math subset is not
available offline), thinking mode on (y+'s reasoning kept in the privileged context), LoRA on
q,k,v,o,gate,up,down, and Avg@12 on AIME 2024, AIME 2025 and HMMT Feb 2025 with Qwen3's
thinking-mode sampling (temperature 0.6, top-p 0.95, top-k 20, min-p 0).

Ablation: a fixed coefficient instead of frontier weights,
`--config.algorithm.weighting=fixed --config.algorithm.fixed_weight=1.0`."""

from configs import base


def get_config(arg=None):
    """`arg`: "[preset][,key=value,...]"; presets and settings: configs/base.py."""
    arg = base.parse_arg(arg)
    c = base.preset_config(arg.preset, run_name="ssopd")
    c.algorithm = base.algorithm_config("ssopd")
    if c.preset == "qwen3_8b":
        c.task.name = "math_aime"  # MATH train (7474) + AIME 1983-2023 (975)
        c.task.eval_sets = "aime:2024,aime:2025,hmmt:test"
        c.model.enable_thinking = True
        c.algorithm.keep_thinking = True  # y+'s <think> reasoning is the privileged context
        c.model.lora.update(rank=32, alpha=64.0, targets="q,k,v,o,gate,up,down")
        c.rollout.max_new_tokens = 8192  # thinking-mode answers; ours, not the paper's number
        c.rollout.eval_n = 12  # Avg@12 = mean@12
        c.rollout.eval_temperature = 0.6
        c.rollout.eval_top_p = 0.95
        c.rollout.eval_top_k = 20
        c.rollout.eval_min_p = 0.0
    return base.apply_settings(c, arg.settings)
