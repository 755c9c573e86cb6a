"""GRPO w/o Norm (METHODS §4): advantage r - mean r."""

from configs import base


def get_config(arg=None):
    """`arg`: "[preset][,key=value,...]"; presets and settings: configs/base.py."""
    arg = base.parse_arg(arg)
    c = base.preset_config(arg.preset, run_name="grpo_no_norm")
    c.algorithm = base.algorithm_config("grpo", normalize=False)
    if c.preset == "qwen3_8b":
        c.rollout.max_new_tokens = 8192  # same budget as GRPO (table A.2)
    return base.apply_settings(c, arg.settings)
