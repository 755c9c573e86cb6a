"""Train with any method of METHODS.md: `python scripts/train.py --config=configs/<method>.py`.

The config argument picks a preset and settings: `--config=configs/sc_sdpo.py:qwen3_8b,steps=50`
(configs/base.py). `configs/<method>.py` is found from any working directory.

Overrides: `--config.optim.lr=3e-6 --config.seed=1 --config.rollout.engine=vllm`.
`--print_config` lists every config key with its value (defaults + overrides) and exits.
Ctrl-C finishes the step in progress, saves a checkpoint and exits with status 130; the same
command continues the run.
Multi-host: run one copy per host; it joins the job the environment describes
(README "More than one host, and TPU"; jaxsd.train.mesh.distributed_args).
"""

from __future__ import annotations

import importlib.util
import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "method config file[:preset], e.g. configs/sc_sdpo.py:smoke; every key can be overridden "
    "with --config.<key>=<value>; --print_config lists the keys and their values",
)
_PRINT = flags.DEFINE_bool("print_config", False, "print every config key = value and exit")


def config_lines(cfg) -> list[str]:
    """`key = value` for every key of the config (the run_dir with its {hash} resolved)."""
    from jaxsd.metrics import flatten_config
    from jaxsd.train.run_config import config_dict, resolve_run_dir

    flat = flatten_config(config_dict(resolve_run_dir(cfg)))
    return [f"{key} = {json.dumps(value)}" for key, value in flat.items()]


def _source() -> str:
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    extra = " ".join(f"--config.{k}={v}" for k, v in overrides.items())
    return f"{path} {extra}".strip()


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<key>=<value>")
    if _CONFIG.value is None:
        raise app.UsageError("pass --config=configs/<method>.py[:preset]")
    if _PRINT.value:
        print("\n".join(config_lines(_CONFIG.value)))
        return 0
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if _CONFIG.value.rollout.engine == "vllm":
        _place_trainer(_CONFIG.value)
    from jaxsd.train.mesh import maybe_initialize_distributed

    # One process per host (SLURM, TPU pod, ...): join the job before JAX sees any device.
    maybe_initialize_distributed()
    from jaxsd.train.loop import train
    from jaxsd.train.report import print_summary
    from jaxsd.train.run_config import ConfigMismatchError
    from jaxsd.train.run_lock import RunDirLockedError

    try:
        summary = train(_CONFIG.value, config_source=_source())
    except ConfigMismatchError as err:
        print(f"[jaxsd] refusing to resume: {err}", file=sys.stderr)
        return 2
    except RunDirLockedError as err:
        print(f"[jaxsd] refusing to start: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the loop took over Ctrl-C, or a second Ctrl-C
        print("\n[jaxsd] interrupted; nothing saved beyond the last checkpoint", file=sys.stderr)
        return 130
    except Exception as err:
        exit_on_error(err)
    print_summary(summary)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))
    return 130 if summary.get("interrupted") else 0  # 128 + SIGINT, as shells report Ctrl-C


def _place_trainer(cfg) -> None:
    """The trainer's GPUs and memory share (placement section), before JAX starts a backend."""
    import os

    from jaxsd.rollout.placement import apply_trainer_env, placement_from_config

    for line in apply_trainer_env(placement_from_config(cfg), os.environ):
        print(f"[jaxsd] placement: {line}", flush=True)


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain (`raise ... from`, or raised while handling)."""
    seen = {id(err)}
    while (inner := err.__cause__ or err.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        err = inner
    return err


def exit_on_error(err: Exception) -> None:
    """Print the traceback, then the root cause as the last line, and leave at once.

    After a failed async save, Orbax's unfinished coroutines and threads print pages of
    "Event loop is closed" / "sys.meta_path is None" while the interpreter shuts down,
    burying the real error; the loop has already closed the checkpointer, the metrics and the
    engine, so nothing is lost by skipping that shutdown.
    """
    import os
    import traceback

    traceback.print_exc()
    cause = root_cause(err)
    first_line = (str(cause).strip().splitlines() or [""])[0]
    print(f"train.py: stopped by {type(cause).__name__}: {first_line}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def check_override_keys(argv: list[str]) -> None:
    """Exit naming a `--config.<key>` override whose key does not exist, with a "did you
    mean" at any depth (config_flags suggests only close spellings of top-level keys)."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return
    path, has_arg, arg = spec.partition(":")
    try:
        module_spec = importlib.util.spec_from_file_location("_jaxsd_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        cfg = module.get_config(arg) if has_arg else module.get_config()
    except ValueError as err:  # a bad preset or setting: the message names it, no traceback
        raise SystemExit(f"train.py: {err}") from None
    except Exception:  # config_flags reports a config file that does not load
        return
    from jaxsd.train.validate import unknown_key_error

    for flag in argv:
        if flag.startswith("--config."):
            message = unknown_key_error(cfg, flag[len("--config.") :].split("=", 1)[0])
            if message:
                raise SystemExit(f"train.py: {message}")


def resolve_config_argv(argv: list[str]) -> list[str]:
    """`--config=configs/<method>.py` found from any working directory (configs.resolve_path);
    exit with the fix when the project's `configs` package is not installed."""
    try:
        import configs
    except ModuleNotFoundError:
        raise SystemExit(
            "train.py: the `configs` package is not importable; install the project "
            "(scripts/setup.sh, or `pip install -e .` in the repository)"
        ) from None
    return configs.resolve_argv(argv)


if __name__ == "__main__":
    sys.argv = resolve_config_argv(sys.argv)
    check_override_keys(sys.argv)
    sys.exit(app.run(main))
