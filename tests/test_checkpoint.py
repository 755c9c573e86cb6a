"""Checkpointer: bit-exact round trips, keep-N, best-by-metric, SIGKILL mid-save, corruption."""

import glob
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsd.train.checkpoint import Checkpointer, CheckpointWarning, validate_host_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _train_state(seed: int) -> dict:
    """Params (f32 + bf16), AdamW state (namedtuples, int32 count), step, PRNG key."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {
        "w": jax.random.normal(k1, (5, 7), jnp.float32),
        "emb": jax.random.normal(k2, (11, 3), jnp.bfloat16),
        "ids": jax.random.randint(k3, (4,), -(2**31), 2**31 - 1, jnp.int32),
    }
    float_params = {k: v for k, v in params.items() if k != "ids"}
    opt_state = optax.adamw(1e-3).init(float_params)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.array(seed, jnp.uint32),
        "rng": jax.random.key(seed + 100),
    }


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=DEVICE), tree)


def _host_state(step: int) -> dict:
    rng = np.random.default_rng(step)
    rng.random(3)  # advance, so the 128-bit PCG64 state is not the seed's
    return {
        "algorithm": {"ema_pass_rate": {"q1": 0.25 * step, "q7": 1.0}, "buffer": [["resp", 1.0]]},
        "data_position": {"epoch": 1, "index": 17 * step},
        "host_rng": rng.bit_generator.state,
        "config": {"method": "drift", "lr": 1e-5, "tags": ["a", "b"], "note": None},
    }


def _bits(x):
    """Raw bytes of an array (typed PRNG keys via their key data) for bitwise comparison."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.atleast_1d(np.asarray(x)).view(np.uint8)


def _assert_bit_exact(actual, expected):
    chex.assert_trees_all_equal_structs(actual, expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(_bits(a), _bits(e))


def test_round_trip_is_bit_exact_for_state_and_host_state(tmp_path):
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _train_state(step), _host_state(step))
        ckpt.wait()
        expected = _train_state(2)
        state, host, step = ckpt.restore(abstract_train_state=_abstract(expected))
    assert step == 2
    _assert_bit_exact(state, expected)
    assert host == _host_state(2)
    # The restored numpy RNG continues the same stream as the saved one.
    rng = np.random.default_rng()
    rng.bit_generator.state = host["host_rng"]
    ref = np.random.default_rng(2)
    ref.random(3)
    np.testing.assert_array_equal(rng.random(5), ref.random(5))
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding == DEVICE


def test_async_save_survives_deleting_the_arrays_right_after(tmp_path):
    """The train step donates the state; save() must have copied it off the device by then."""
    state = _train_state(5)
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(5, state, {})
        for leaf in jax.tree.leaves(state):
            leaf.delete()
        ckpt.wait()
        restored, _, _ = ckpt.restore(abstract_train_state=_abstract(_train_state(0)))
    _assert_bit_exact(restored, _train_state(5))


def test_restore_explicit_older_step(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _train_state(step), _host_state(step))
        state, host, step = ckpt.restore(1, abstract_train_state=_abstract(_train_state(0)))
    assert step == 1 and host == _host_state(1)
    _assert_bit_exact(state, _train_state(1))


def test_relative_run_dir_works(tmp_path, monkeypatch):
    """`--config.run_dir=runs/x` is relative; Orbax itself only takes absolute paths."""
    monkeypatch.chdir(tmp_path)
    with Checkpointer("runs/rel", async_save=False) as ckpt:
        ckpt.save(1, _train_state(1), _host_state(1))
        state, host, step = ckpt.restore(abstract_train_state=_abstract(_train_state(0)))
    assert step == 1 and host == _host_state(1)
    _assert_bit_exact(state, _train_state(1))
    assert (tmp_path / "runs" / "rel" / "checkpoints" / "1").is_dir()


def test_keeps_latest_n(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2, async_save=True) as ckpt:
        small = {"x": jnp.zeros(3)}
        for step in range(1, 6):
            ckpt.save(step, small, {"step": step})
        ckpt.wait()
        assert ckpt.all_steps() == [4, 5]
        assert ckpt.latest_step() == 5
    on_disk = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
    assert on_disk == [4, 5]


def test_best_by_metric_keeps_best_and_latest(tmp_path):
    accuracy = {1: 0.1, 2: 0.9, 3: 0.3, 4: 0.2}
    with Checkpointer(tmp_path, max_to_keep=1, best_metric="acc", async_save=False) as ckpt:
        for step, acc in accuracy.items():
            ckpt.save(step, {"x": jnp.full(2, step)}, {}, metrics={"acc": acc})
        assert ckpt.all_steps() == [2, 4]
        assert ckpt.best_step() == 2
        with pytest.raises(ValueError, match="'acc'"):
            ckpt.save(5, {"x": jnp.zeros(2)}, {}, metrics={"loss": 1.0})


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import jax, jax.numpy as jnp
    from jaxsd.train.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], async_save=True)
    big = jax.random.uniform(jax.random.key(0), (4_000_000,))
    ckpt.save(1, {"big": big, "tag": jnp.int32(1)}, {"step": 1})
    ckpt.wait()
    ckpt.save(2, {"big": big + 1.0, "tag": jnp.int32(2)}, {"step": 2})
    # save() returned: the async write of step 2 is under way; die without any cleanup.
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_sigkill_mid_save_restores_previous_complete_step(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path)], env=env, capture_output=True
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    leftovers = glob.glob(str(tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp*"))
    assert leftovers, "the kill did not land mid-save; the test proves nothing"
    abstract = {
        "big": jax.ShapeDtypeStruct((4_000_000,), jnp.float32, sharding=DEVICE),
        "tag": jax.ShapeDtypeStruct((), jnp.int32, sharding=DEVICE),
    }
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        state, host, step = ckpt.restore(abstract_train_state=abstract)
    assert step == 1 and host == {"step": 1} and int(state["tag"]) == 1
    expected = jax.random.uniform(jax.random.key(0), (4_000_000,))
    np.testing.assert_array_equal(np.asarray(state["big"]), np.asarray(expected))
    # Orbax removes the unfinished tmp dir when a manager opens the directory again.
    assert not glob.glob(str(tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp*"))


def _truncate_data(step_dir):
    # Orbax merges per-process OCDBT files into state/d; truncate every data file.
    for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _remove_state_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _truncate_host_json(step_dir):
    with open(os.path.join(step_dir, "host", "metadata"), "r+b") as fh:
        fh.truncate(5)


# Orbax's async reader may log "Event loop is closed" after a failed read; it is harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", [_truncate_data, _remove_state_metadata, _truncate_host_json])
def test_corrupt_latest_falls_back_to_previous_with_warning(tmp_path, corrupt):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _train_state(step), _host_state(step))
    corrupt(str(tmp_path / "checkpoints" / "2"))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.warns(CheckpointWarning, match="step 2") as record:
            state, host, step = ckpt.restore(abstract_train_state=_abstract(_train_state(0)))
        assert any("failed to restore" in str(w.message) for w in record)
        assert step == 1 and host == _host_state(1)
        _assert_bit_exact(state, _train_state(1))
        # The bad step was moved aside, so the resumed run can write step 2 again.
        assert ckpt.all_steps() == [1]
        assert len(glob.glob(str(tmp_path / "corrupt_checkpoints" / "2-*"))) == 1
        ckpt.save(2, _train_state(22), _host_state(22))
        ckpt.wait()
        state, host, step = ckpt.restore(abstract_train_state=_abstract(_train_state(0)))
    assert step == 2 and host == _host_state(22)
    _assert_bit_exact(state, _train_state(22))


def test_no_restorable_checkpoint_raises_naming_the_dir(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            ckpt.restore(abstract_train_state={"x": jnp.zeros(2)})
        ckpt.save(1, {"x": jnp.zeros(2)}, {})
        # A tree that does not match the checkpoint: nothing restores, nothing is moved.
        with pytest.warns(CheckpointWarning), pytest.raises(RuntimeError, match=str(tmp_path)):
            ckpt.restore(abstract_train_state={"y": jnp.zeros(3)})
        assert ckpt.all_steps() == [1]


def test_bad_inputs_name_the_culprit(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(ValueError, match=r"host_state\['a'\]\[1\].*list"):
            ckpt.save(1, {"x": jnp.zeros(2)}, {"a": [1, (2, 3)]})
        with pytest.raises(ValueError, match="key 3 of type int"):
            ckpt.save(1, {"x": jnp.zeros(2)}, {"buf": {3: 1.0}})
        with pytest.raises(ValueError, match="ndarray"):
            ckpt.save(1, {"x": jnp.zeros(2)}, {"p": np.zeros(2)})
        ckpt.save(1, {"x": jnp.zeros(2)}, {})
        with pytest.raises(ValueError, match=r"\['x'\] has no sharding"):
            ckpt.restore(abstract_train_state={"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
    with pytest.raises(ValueError, match="max_to_keep=0"):
        Checkpointer(tmp_path, max_to_keep=0)


_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**130), max_value=2**130)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5)
)
_json_tree = st.recursive(
    _json_leaf,
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text(max_size=4), _json_tree, max_size=4))
def test_valid_host_state_round_trips_through_json_exactly(host_state):
    validate_host_state(host_state)
    assert json.loads(json.dumps(host_state)) == host_state


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxsd.train.checkpoint import Checkpointer
    assert jax.device_count() == 2
    mesh = Mesh(np.array(jax.devices()), ("x",))
    split, repl = NamedSharding(mesh, P("x")), NamedSharding(mesh, P())
    value = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    with Checkpointer(sys.argv[1], async_save=False) as ckpt:
        ckpt.save(1, {"w": jax.device_put(value, split)}, {})
        for target in (repl, split):
            abstract = {"w": jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=target)}
            state, _, _ = ckpt.restore(abstract_train_state=abstract)
            assert state["w"].sharding == target, state["w"].sharding
            np.testing.assert_array_equal(np.asarray(state["w"]), value)
            shards = {s.device.id: np.asarray(s.data) for s in state["w"].addressable_shards}
            want = value[:4] if target is split else value
            np.testing.assert_array_equal(shards[0], want)
    print("SHARDED_OK")
    """
)


def test_restore_onto_two_device_shardings(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT, str(tmp_path)], env=env, capture_output=True
    )
    assert proc.returncode == 0 and b"SHARDED_OK" in proc.stdout, proc.stderr.decode()[-3000:]


def _flip_four_bytes(step_dir):
    """Bit rot: four bytes in the middle of the step's largest data file change in place."""
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    target = max(files, key=os.path.getsize)
    with open(target, "r+b") as fh:
        fh.seek(os.path.getsize(target) // 2)
        data = fh.read(4)
        fh.seek(-4, os.SEEK_CUR)
        fh.write(bytes(b ^ 0xFF for b in data))
    return target


# Orbax's async reader may log "Event loop is closed" after a failed read; it is harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_flipped_bytes_fail_the_checksum_and_restore_falls_back(tmp_path):
    with Checkpointer(tmp_path) as ckpt:  # async saves: checksums follow each finished save
        for step in (1, 2):
            ckpt.save(step, _train_state(step), _host_state(step))
    for step in (1, 2):  # every file of the step, with its SHA-256
        folder = tmp_path / "checkpoints" / str(step)
        sums = json.loads((folder / "checksums.json").read_text())
        on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        assert set(sums) == on_disk - {"checksums.json"} and any("/d/" in n for n in sums)
        for name, digest in sums.items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    damaged = _flip_four_bytes(str(tmp_path / "checkpoints" / "2"))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.warns(CheckpointWarning, match="step 2") as record:
            state, host, step = ckpt.restore(abstract_train_state=_abstract(_train_state(0)))
        assert any("does not match the checksum" in str(w.message) for w in record)
        assert any(os.path.basename(damaged) in str(w.message) for w in record)
        assert step == 1 and host == _host_state(1)  # the good checkpoint is intact and used
        _assert_bit_exact(state, _train_state(1))
        assert ckpt.all_steps() == [1]
        assert len(glob.glob(str(tmp_path / "corrupt_checkpoints" / "2-*"))) == 1
        ckpt.save(2, _train_state(22), _host_state(22))  # and the run goes on
        ckpt.wait()
        _, host, step = ckpt.restore(abstract_train_state=_abstract(_train_state(0)))
    assert step == 2 and host == _host_state(22)


def test_set_aside_after_keeps_newer_steps_out_of_the_way(tmp_path):
    with Checkpointer(tmp_path, async_save=False, max_to_keep=5) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _train_state(step), _host_state(step))
        with pytest.warns(CheckpointWarning, match="newer than resumed step 1"):
            assert ckpt.set_aside_after(1) == [2, 3]
        assert ckpt.all_steps() == [1]
        kept = sorted(os.listdir(tmp_path / "superseded_checkpoints"))
        assert [name.split("-")[0] for name in kept] == ["2", "3"]
        ckpt.save(2, _train_state(22), _host_state(22))
