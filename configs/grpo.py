"""GRPO (METHODS §4) with std-normalised group advantages; no teacher."""

from configs import base


def get_config(arg=None):
    """`arg`: "[preset][,key=value,...]"; presets and settings: configs/base.py."""
    arg = base.parse_arg(arg)
    c = base.preset_config(arg.preset, run_name="grpo")
    c.algorithm = base.algorithm_config("grpo", normalize=True)
    if c.preset == "qwen3_8b":
        c.rollout.max_new_tokens = 8192  # the paper gives GRPO a longer budget (table A.2)
    return base.apply_settings(c, arg.settings)
