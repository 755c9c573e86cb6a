"""PACED baseline (METHODS §5): SDPO weighted by frozen offline pass rates, a = 1."""

import pathlib
import sys

# ml_collections loads config files by path; make the sibling `configs.base` importable.
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from configs import base  # noqa: E402


def get_config(arg=None):
    """Presets: "" (embedded CPU run), "smoke", "qwen3_8b" (see configs/base.py)."""
    c = base.get_config(arg, run_name="paced")
    c.algorithm = base.algorithm_config("paced", exponent=1.0)
    c.paced_offline_n = c.rollout.n  # rollouts per question in the offline pass
    return c
