"""SRPO baseline (METHODS §8): wrong rollouts with a correct sibling -> SDPO, rest -> GRPO."""

from configs import base


def get_config(arg=None):
    """`arg`: "[preset][,key=value,...]"; presets and settings: configs/base.py."""
    arg = base.parse_arg(arg)
    c = base.preset_config(arg.preset, run_name="srpo")
    c.algorithm = base.algorithm_config("srpo")
    return base.apply_settings(c, arg.settings)
