"""Faults a user's run meets: a NaN-producing optimizer, two runs on one folder, resume_step.

Each asserts that no good checkpoint is lost and that the run can go on afterwards.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsd.metrics import read_metrics
from jaxsd.train import loop
from jaxsd.train.run_lock import RunDirLockedError, lock_run_dir
from tests.test_loop import load_checkpoint, load_config


def smoke(run_dir: pathlib.Path, steps: int = 3):
    cfg = load_config("sdpo")
    cfg.run_dir = str(run_dir)
    cfg.total_steps = steps
    cfg.checkpoint_every = 1
    cfg.eval_every = 0
    return cfg


def nan_updates_from(count: int, *, on: bool) -> optax.GradientTransformation:
    """With `on`, NaN updates from optimizer step `count` + 1 (as optim.eps = 0 gives once a
    second moment is 0) while loss and gradients stay finite; without, the identity (the same
    optimizer-state structure, so a fixed run restores the same checkpoints)."""

    def init(params):
        return jnp.zeros((), jnp.int32)

    def update(updates, state, params=None):
        scale = jnp.where((state >= count) & on, jnp.nan, 1.0)
        return jax.tree.map(lambda u: u * scale, updates), state + 1

    return optax.GradientTransformation(init, update)


def test_a_non_finite_update_is_never_saved_and_resume_step_goes_back(tmp_path, monkeypatch):
    from jaxsd.train import build

    make = build.make_optimizer
    poisoned = {"on": True}
    monkeypatch.setattr(
        build,
        "make_optimizer",
        lambda *a, **k: optax.chain(make(*a, **k), nan_updates_from(2, on=poisoned["on"])),
    )
    cfg = smoke(tmp_path / "run", steps=4)
    with pytest.raises(FloatingPointError, match=r"step 3 made params.*optim\.eps") as err:
        loop.train(cfg)
    assert "resume_step" in str(err.value)
    checkpoints = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == [1, 2]  # the NaN state of step 3 was not saved
    state, _ = load_checkpoint(tmp_path / "run", 2)
    assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f")

    poisoned["on"] = False  # the user fixes the setting and reruns: it goes on from step 2
    summary = loop.train(cfg)
    assert summary["start_step"] == 2
    rows = read_metrics(cfg.run_dir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert not any(k.startswith("state_finite") for r in rows for k in r)

    cfg.resume_step = 2  # go back to step 2 on purpose: steps 3 and 4 are kept aside
    assert loop.train(cfg)["start_step"] == 2
    superseded = tmp_path / "run" / "superseded_checkpoints"
    assert sorted(p.name.split("-")[0] for p in superseded.iterdir()) == ["3", "4"]
    assert [r["step"] for r in read_metrics(cfg.run_dir) if "loss" in r] == [1, 2, 3, 4]
    cfg.resume_step = 7
    with pytest.raises(FileNotFoundError, match=r"resume step 7 .* have \[2, 3, 4\]"):
        loop.train(cfg)


HOLDER = """
import sys, time
from jaxsd.train.run_lock import lock_run_dir
lock = lock_run_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_a_locked_folder_refuses_at_once(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')  # the first run's
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLockedError) as err:
            loop.train(smoke(run_dir))
        message = str(err.value)
        assert str(run_dir) in message and f"pid {holder.pid}" in message
        assert socket.gethostname() in message
        assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'
        assert not (run_dir / "checkpoints").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # the OS drops the lock of a killed holder
        holder.wait()
    with lock_run_dir(run_dir):
        with pytest.raises(RunDirLockedError, match=f"pid {os.getpid()}"):
            lock_run_dir(run_dir)


DISK_FULL = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), like ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # the checkpoint needs ~8 MB
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_failed_checkpoint_write_ends_with_the_root_cause(tmp_path):
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(repo))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # its entries would hit the file size limit
    cmd = [sys.executable, "-c", DISK_FULL, str(repo / "scripts" / "train.py"),
           f"--config={repo / 'configs' / 'sdpo.py'}:smoke", f"--config.run_dir={tmp_path}",
           "--config.total_steps=1", "--config.eval_every=0"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("train.py: stopped by ") and "File too large" in lines[-1]
    assert "sys.meta_path is None" not in done.stderr
    tail = done.stderr[done.stderr.rindex("Traceback (most recent call last)") :]
    assert "Event loop is closed" not in tail
    # nothing half-written counts as a checkpoint, and the folder is free for a rerun
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    lock_run_dir(tmp_path).release()
