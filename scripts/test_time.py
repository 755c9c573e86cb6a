"""Test-time self-distillation: `python scripts/test_time.py --config=configs/test_time_sdpo.py`.

Overrides: `--config.test_time.ids=test/3,test/7 --config.test_time.budget=32`. Writes
<run_dir>/test_time.json (per question: generations to the first success; discovery@k curves)
and <run_dir>/test_time.png, and prints the summary without the curves.
"""

from __future__ import annotations

import json
import sys

from absl import app, logging
from ml_collections import config_flags

import configs

_CONFIG = config_flags.DEFINE_config_file("config", None, "test-time config file[:preset]")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<key>=<value>")
    if _CONFIG.value is None:
        raise app.UsageError("pass --config=configs/test_time_sdpo.py[:preset]")
    logging.set_verbosity(logging.WARNING)
    from jaxsd.test_time import run_test_time

    summary = run_test_time(_CONFIG.value)
    print(json.dumps({k: v for k, v in summary.items() if k != "discovery_at_k"}))


if __name__ == "__main__":
    sys.argv = configs.resolve_argv(sys.argv)  # configs/<file>.py from any working directory
    sys.exit(app.run(main))
