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
    make = loop.make_optimizer
    poisoned = {"on": True}
    monkeypatch.setattr(
        loop,
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
