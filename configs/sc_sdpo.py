"""SC-SDPO (METHODS §5): SDPO with batch-adaptive weights [p(1-p)]^a, a = 1/2.

Variance weighting (a = 1): `--config.algorithm.exponent=1.0`."""

import pathlib
import sys

# ml_collections loads config files by path; make the sibling `configs.base` importable.
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from configs import base  # noqa: E402


def get_config(arg=None):
    """Presets: "" (embedded CPU run), "smoke", "qwen3_8b" (see configs/base.py)."""
    c = base.get_config(arg, run_name="sc_sdpo")
    c.algorithm = base.algorithm_config("sc_sdpo", exponent=0.5)
    return c
