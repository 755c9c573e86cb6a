"""Orbax weight publishing: exact round trip, atomic visibility, keep-N, clear errors."""

import pathlib

import hypothesis.strategies as st
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from jaxsd.rollout.weights import (
    CheckpointRestoreError,
    latest_step,
    publish_weights,
    published_steps,
    restore_weights,
    step_path,
)

_DTYPES = (np.float32, np.float16, ml_dtypes.bfloat16, np.int32)
_NAME = st.from_regex(r"model\.layers\.[0-9]\.[a-z_]{1,8}\.(weight|bias)", fullmatch=True)


def _tensor(draw_shape, dtype, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(draw_shape) * 3).astype(dtype)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    names=st.lists(_NAME, min_size=1, max_size=4, unique=True),
    shapes=st.lists(st.lists(st.integers(1, 5), max_size=3), min_size=4, max_size=4),
    dtypes=st.lists(st.sampled_from(_DTYPES), min_size=4, max_size=4),
    step=st.integers(0, 10**6),
)
def test_publish_then_restore_is_exact_for_any_flat_hf_dict(tmp_path, names, shapes, dtypes, step):
    weights_dir = tmp_path / f"w{step}"
    state = {
        name: _tensor(tuple(shape), dtype, i)
        for i, (name, shape, dtype) in enumerate(zip(names, shapes, dtypes, strict=False))
    }
    path = publish_weights(state, weights_dir, step)
    assert path == step_path(weights_dir, step).absolute()
    restored = restore_weights(weights_dir, step)
    assert sorted(restored) == sorted(state)  # dotted HF names stay flat keys
    for name, arr in state.items():
        assert restored[name].dtype == arr.dtype, name
        np.testing.assert_array_equal(restored[name], arr)
    assert latest_step(weights_dir) == step


def test_jax_arrays_are_published_like_numpy(tmp_path):
    state = {"lm_head.weight": jnp.arange(12, dtype=jnp.float32).reshape(3, 4)}
    publish_weights(state, tmp_path, 1)
    np.testing.assert_array_equal(
        restore_weights(tmp_path, 1)["lm_head.weight"], np.arange(12).reshape(3, 4)
    )


def test_keep_n_deletes_the_oldest_steps_and_an_older_publish_rewinds(tmp_path):
    for step in range(5):
        publish_weights({"w": np.full((2,), step, np.float32)}, tmp_path, step, keep=2)
    assert published_steps(tmp_path) == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]
    publish_weights({"w": np.full((2,), 40.0, np.float32)}, tmp_path, 4, keep=2)
    np.testing.assert_array_equal(restore_weights(tmp_path, 4)["w"], [40.0, 40.0])
    publish_weights({"w": np.full((2,), 1.0, np.float32)}, tmp_path, 1, keep=2)  # rewound run
    assert published_steps(tmp_path) == [1]  # newer steps are from the abandoned timeline


def test_unfinished_steps_are_invisible(tmp_path):
    publish_weights({"w": np.ones(2, np.float32)}, tmp_path, 3)
    (tmp_path / "9.orbax-checkpoint-tmp-1795635505").mkdir()  # a save still in progress
    (tmp_path / "notes").mkdir()
    assert published_steps(tmp_path) == [3]
    assert latest_step(tmp_path) == 3
    assert latest_step(tmp_path / "nothing_here") is None


def _corrupt(path: pathlib.Path) -> None:
    for f in path.rglob("*"):
        if f.is_file() and not f.name.startswith("_") and f.name != "commit_success.txt":
            f.write_bytes(b"\x00garbage" * 7)


def test_corrupt_and_missing_steps_raise_errors_naming_the_step(tmp_path):
    publish_weights({"w": np.ones((4, 4), np.float32)}, tmp_path, 1)
    publish_weights({"w": np.ones((4, 4), np.float32)}, tmp_path, 2)
    _corrupt(step_path(tmp_path, 2))
    with pytest.raises(CheckpointRestoreError, match=r"/2 is unreadable.*re-publish"):
        restore_weights(tmp_path, 2)
    with pytest.raises(CheckpointRestoreError, match=r"no finished weights checkpoint.*\[1, 2\]"):
        restore_weights(tmp_path, 5)
    np.testing.assert_array_equal(restore_weights(tmp_path, 1)["w"], np.ones((4, 4)))


def test_bad_inputs_are_rejected_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        publish_weights({}, tmp_path, 0)
    with pytest.raises(ValueError, match="keep=0"):
        publish_weights({"w": np.ones(1)}, tmp_path, 0, keep=0)
    with pytest.raises(TypeError, match="'w' is not a numeric array"):
        publish_weights({"w": np.array([object()])}, tmp_path, 0)
    with pytest.raises(ValueError, match="step=-1"):
        publish_weights({"w": np.ones(1)}, tmp_path, -1)
    assert published_steps(tmp_path) == []


def _bytes_on_disk(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_steps_are_stored_uncompressed_so_the_exchange_runs_at_disk_speed(tmp_path):
    # All-zero tensors shrink ~1000x under zstd; stored raw they take their full size on disk.
    zeros = {
        f"model.layers.{i}.mlp.up_proj.weight": np.zeros((256, 256), np.float32) for i in (0, 1)
    }
    path = publish_weights(zeros, tmp_path, 0)
    raw = sum(v.nbytes for v in zeros.values())
    assert raw <= _bytes_on_disk(path) < raw + 64 * 1024  # data plus small metadata files


def test_steps_published_with_orbax_defaults_still_restore(tmp_path):
    import orbax.checkpoint as ocp

    state = {"lm_head.weight": _tensor((8, 4), np.float32, 0), "model.norm.weight": np.ones(4)}
    with ocp.StandardCheckpointer() as checkpointer:  # the old publisher: compressed, async
        checkpointer.save(step_path(tmp_path, 2).absolute(), state)
        checkpointer.wait_until_finished()
    restored = restore_weights(tmp_path, 2)
    for name, arr in state.items():
        np.testing.assert_array_equal(restored[name], arr)


_PUBLISH_SCRIPT = """
import sys
import jax.numpy as jnp
import numpy as np
from jaxsd.rollout.weights import publish_weights
state = {f"model.layers.{i}.mlp.up_proj.weight": np.full((64, 64), i, np.float32) for i in (0, 1)}
state["lm_head.weight"] = jnp.ones((8, 64), jnp.bfloat16)  # a jax.Array: the other handler
publish_weights(state, sys.argv[1], 3, fsync=sys.argv[2] == "1")
"""


def _data_fsyncs(tmp_path: pathlib.Path, fsync: bool) -> list[str]:
    """Paths the publishing process fsynced inside the tensor data (OCDBT per-process files)."""
    import shutil
    import subprocess
    import sys

    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: cannot observe fsync calls")
    trace, weights_dir = tmp_path / f"trace{int(fsync)}", tmp_path / f"w{int(fsync)}"
    cmd = ["strace", "-f", "-qq", "-y", "-e", "trace=fsync,fdatasync", "-o", str(trace)]
    cmd += [sys.executable, "-c", _PUBLISH_SCRIPT, str(weights_dir), str(int(fsync))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "ptrace" in proc.stderr.lower():
        pytest.skip(f"strace cannot trace here: {proc.stderr[-200:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for i in (0, 1):  # the step restores exactly either way
        got = restore_weights(weights_dir, 3)[f"model.layers.{i}.mlp.up_proj.weight"]
        np.testing.assert_array_equal(got, np.full((64, 64), i, np.float32))
    calls = [line for line in trace.read_text().splitlines() if "sync(" in line]
    assert calls, "no fsync at all: Orbax's own metadata commit should still sync"
    return [line for line in calls if "ocdbt.process_" in line]


def test_the_exchange_leaves_tensor_data_to_os_write_back_unless_fsync_is_asked(tmp_path):
    # The default publish fsyncs only Orbax's small commit files (the merged manifest and
    # folders); fsync=True also syncs every data file the tensors were written to.
    assert _data_fsyncs(tmp_path, fsync=False) == []
    assert len(_data_fsyncs(tmp_path, fsync=True)) >= 2


@pytest.mark.parametrize("fsync", [False, True])
def test_every_tensor_write_opens_tensorstore_with_the_asked_file_sync(
    tmp_path, monkeypatch, fsync
):
    # Runs where strace does not: the context each tensor's TensorStore is opened with (numpy
    # and jax.Array handlers alike) resolves `file_io_sync` to `fsync`.
    import tensorstore as ts

    contexts = []
    real_open = ts.open

    def recording_open(*args, **kwargs):
        if kwargs.get("create"):
            contexts.append(kwargs["context"])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(ts, "open", recording_open)
    state = {f"model.layers.{i}.mlp.up_proj.weight": np.full((8, 8), i, np.float32) for i in (0, 1)}
    state["lm_head.weight"] = jnp.ones((4, 8), jnp.bfloat16)
    publish_weights(state, tmp_path, 1, fsync=fsync)
    assert len(contexts) == len(state)
    assert {c["file_io_sync"].to_json() for c in contexts} == {fsync}
    assert len({id(c) for c in contexts}) == 1  # one context per save: one OCDBT kvstore
    monkeypatch.undo()
    np.testing.assert_array_equal(
        restore_weights(tmp_path, 1)["model.layers.1.mlp.up_proj.weight"], 1
    )
