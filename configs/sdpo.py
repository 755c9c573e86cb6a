"""SDPO (METHODS §1): self-distillation on every rollout with a solution or feedback."""

from configs import base


def get_config(arg=None):
    """`arg`: "[preset][,key=value,...]"; presets and settings: configs/base.py."""
    arg = base.parse_arg(arg)
    c = base.preset_config(arg.preset, run_name="sdpo")
    c.algorithm = base.algorithm_config("sdpo")
    return base.apply_settings(c, arg.settings)
