"""Train with any method of METHODS.md: `python scripts/train.py --config=configs/<method>.py`.

Overrides: `--config.optim.lr=3e-6 --config.seed=1 --config.rollout.engine=vllm`.
"""

from __future__ import annotations

import json
import sys

from absl import app, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "method config file[:preset]")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<key>=<value>")
    if _CONFIG.value is None:
        raise app.UsageError("pass --config=configs/<method>.py[:preset]")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if _CONFIG.value.rollout.engine == "vllm":
        _place_trainer(_CONFIG.value)
    from jaxsd.train.loop import train
    from jaxsd.train.report import print_summary

    summary = train(_CONFIG.value)
    print_summary(summary)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))


def _place_trainer(cfg) -> None:
    """The trainer's GPUs and memory share (placement section), before JAX starts a backend."""
    import os

    from jaxsd.rollout.placement import apply_trainer_env, placement_from_config

    for line in apply_trainer_env(placement_from_config(cfg), os.environ):
        print(f"[jaxsd] placement: {line}", flush=True)


if __name__ == "__main__":
    sys.exit(app.run(main))
