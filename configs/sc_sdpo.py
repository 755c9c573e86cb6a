"""SC-SDPO (METHODS §5): SDPO with batch-adaptive weights [p(1-p)]^a, a = 1/2.

Variance weighting (a = 1): `--config.algorithm.exponent=1.0`."""

from configs import base


def get_config(arg=None):
    """`arg`: "[preset][,key=value,...]"; presets and settings: configs/base.py."""
    arg = base.parse_arg(arg)
    c = base.preset_config(arg.preset, run_name="sc_sdpo")
    c.algorithm = base.algorithm_config("sc_sdpo", exponent=0.5)
    return base.apply_settings(c, arg.settings)
