"""The sharded step equals the single-device step: 8 simulated CPU devices, and 2 processes x 4
devices joined by jax.distributed (gloo) on 127.0.0.1, each process fed only its own rows;
and two copies of scripts/train.py started as one job train like one process.

The device count is fixed when JAX starts, so the runs happen in subprocesses (this file is
also their entry point); the pytest process itself never sets XLA_FLAGS.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve()
REPO = HERE.parents[1]
MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))
STEPS = 3


# ---------------------------------------------------------------- subprocess side


def _setup():
    import jax.numpy as jnp  # noqa: F401  (jax must import after XLA_FLAGS is set)

    from jaxsd.algorithms import LossWeights
    from jaxsd.models import ModelConfig
    from jaxsd.train.batch import TrainSample
    from jaxsd.train.optimizer import make_optimizer
    from jaxsd.train.step import StepConfig

    cfg = ModelConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    rng = np.random.default_rng(11)
    samples = []
    for _ in range(8):
        r = int(rng.integers(3, 12))
        samples.append(
            TrainSample(
                prompt_ids=rng.integers(1, 128, int(rng.integers(2, 6))).tolist(),
                response_ids=rng.integers(1, 128, r).tolist(),
                old_logp=(-4.8 + 0.3 * rng.normal(size=r)).astype(np.float32),
                teacher_prompt_ids=rng.integers(1, 128, int(rng.integers(4, 9))).tolist(),
                weights=LossWeights(
                    advantage=float(rng.normal()),
                    pg_weight=1.0,
                    sd_weight=float(rng.uniform(0.5, 1.5)),
                ),
            )
        )
    # topk_block=4: the block-max-pruned top-k (32 blocks -> 16) runs on the vocab axis that
    # the "tensor" mesh axis shards; its single-device result equals lax.top_k's
    # (test_train_step.py::test_pruned_top_k_step_equals_the_plain_step).
    step_cfg = StepConfig(
        use_surrogate=True, top_k=16, topk_block=4, chunk_size=16, teacher_mode="fixed"
    )
    # lr 1e-4: Adam turns 1-ulp gradient differences of near-zero entries into lr-sized
    # steps, so the sharded-vs-single tolerance (1e-5 absolute) scales with lr.
    return cfg, samples, make_optimizer(1e-4), step_cfg


def _flat(tree) -> dict[str, np.ndarray]:
    import jax

    return {
        jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def _run(step, state, batch):
    """3 steps; also how far the teacher moved from its own initial value."""
    import jax

    teacher0 = _flat(jax.device_get(state.teacher))
    for _ in range(STEPS):
        state, metrics = step(state, batch)
    state = jax.device_get(state)
    return state, jax.device_get(metrics), _max_diff(_flat(state.teacher), teacher0)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def worker_single(out: pathlib.Path) -> None:
    """Baseline on one device, then each mesh over 8 devices; writes diffs and params."""
    import dataclasses

    import jax
    from flax import nnx

    from jaxsd.models import Transformer
    from jaxsd.train.batch import batch_shardings, build_batch, global_batch
    from jaxsd.train.mesh import make_mesh
    from jaxsd.train.state import create_train_state, train_state_from_model
    from jaxsd.train.step import make_train_step

    assert jax.device_count() == 8, jax.devices()
    cfg, samples, tx, step_cfg = _setup()
    batch_np = build_batch(samples, pad_id=0, length_buckets=(16, 32))
    graphdef, state, _ = train_state_from_model(
        Transformer(cfg, rngs=nnx.Rngs(0)), tx, teacher_mode="fixed"
    )
    init = _flat(jax.device_get(state.params))
    base, base_metrics, moved = _run(make_train_step(graphdef, tx, step_cfg), state, batch_np)
    base_params = _flat(base.params)
    report = {"moved": _max_diff(base_params, init), "teacher_moved": {"single": moved}}
    for shape in MESHES:
        mesh = make_mesh(shape)
        cfg_m = step_cfg
        if shape == (2, 2, 2):
            # sharded random init + gradient accumulation over 2 micro-batches
            graphdef, state, sh = create_train_state(
                lambda r: Transformer(cfg, rngs=r), tx, mesh=mesh, seed=0, teacher_mode="fixed"
            )
            report["sharded_init_diff"] = _max_diff(_flat(jax.device_get(state.params)), init)
            cfg_m = dataclasses.replace(step_cfg, micro_batches=2)
        else:
            # (2, 4, 1): rematerialised layers (same weights and names) must train like
            # the single-device baseline.
            cfg_s = cfg if shape != (2, 4, 1) else dataclasses.replace(cfg, remat=True)
            graphdef, state, sh = train_state_from_model(
                Transformer(cfg_s, rngs=nnx.Rngs(0)), tx, mesh=mesh, teacher_mode="fixed"
            )
        specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
        step = make_train_step(
            graphdef, tx, cfg_m, state_shardings=sh, batch_shardings=batch_shardings(mesh)
        )
        final, metrics, moved = _run(step, state, global_batch(batch_np, batch_shardings(mesh)))
        name = "x".join(map(str, shape))
        report[name] = {
            "params_diff": _max_diff(_flat(final.params), base_params),
            "loss_diff": abs(float(metrics["loss"][0]) - float(base_metrics["loss"][0])),
            "n_specs": len(specs),
        }
        report["teacher_moved"][name] = moved
        if shape == (2, 2, 2):
            np.savez(out / "single_2x2x2.npz", **_flat(final.params))
    (out / "single.json").write_text(json.dumps(report))


def worker_multi(port: int, process_id: int, out: pathlib.Path) -> None:
    """One of 2 processes x 4 devices; builds only its own 4 rows of the batch."""
    import dataclasses

    from jaxsd.train.mesh import initialize_distributed

    initialize_distributed(f"127.0.0.1:{port}", 2, process_id, cpu_collectives="gloo")
    import jax
    from jax.experimental import multihost_utils

    from jaxsd.models import Transformer
    from jaxsd.train.batch import batch_shardings, build_batch, global_batch, global_batch_lengths
    from jaxsd.train.mesh import make_mesh
    from jaxsd.train.state import create_train_state
    from jaxsd.train.step import make_train_step

    assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 4, 8)
    cfg, samples, tx, step_cfg = _setup()
    local = samples[4 * process_id : 4 * process_id + 4]
    mesh = make_mesh((2, 2, 2))
    graphdef, state, sh = create_train_state(
        lambda r: Transformer(cfg, rngs=r), tx, mesh=mesh, seed=0, teacher_mode="fixed"
    )
    local_np = build_batch(
        local, pad_id=0, length_buckets=(16, 32), lengths=global_batch_lengths(local)
    )
    batch = global_batch(local_np, batch_shardings(mesh))
    step = make_train_step(
        graphdef,
        tx,
        dataclasses.replace(step_cfg, micro_batches=2),
        state_shardings=sh,
        batch_shardings=batch_shardings(mesh),
    )
    for _ in range(STEPS):
        state, _ = step(state, batch)
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if process_id == 0:
        np.savez(out / "multi.npz", **_flat(params))
    multihost_utils.sync_global_devices("done")


# ---------------------------------------------------------------- pytest side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args: list[str], devices: int) -> subprocess.Popen:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )
    return subprocess.Popen(
        [sys.executable, str(HERE), *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All three processes at once (the 2-core CI runs them side by side)."""
    out = tmp_path_factory.mktemp("distributed")
    port = str(_free_port())
    procs = {
        "single": _spawn(["single", str(out)], 8),
        "multi0": _spawn(["multi", port, "0", str(out)], 4),
        "multi1": _spawn(["multi", port, "1", str(out)], 4),
    }
    logs = {}
    for name, p in procs.items():
        try:
            logs[name], _ = p.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            raise
        assert p.returncode == 0, f"{name} failed:\n{logs[name][-4000:]}"
    return json.loads((out / "single.json").read_text()), out


def test_meshes_equal_single_device_after_three_steps(runs):
    report, _ = runs
    assert report["moved"] > 1e-4  # the steps changed the params
    for shape in MESHES:
        r = report["x".join(map(str, shape))]
        assert r["params_diff"] <= 1e-5, (shape, r)
        assert r["loss_diff"] <= 1e-5, (shape, r)
        assert r["n_specs"] > 1  # params really are sharded in different ways
    assert report["sharded_init_diff"] <= 1e-7  # jit(out_shardings) init == eager init


def test_fixed_teacher_never_changes(runs):
    report, _ = runs
    assert report["teacher_moved"] == {k: 0.0 for k in report["teacher_moved"]}
    assert len(report["teacher_moved"]) == 1 + len(MESHES)


def test_two_processes_equal_single_process(runs):
    _, out = runs
    single, multi = np.load(out / "single_2x2x2.npz"), np.load(out / "multi.npz")
    assert sorted(single.files) == sorted(multi.files) and single.files
    for k in single.files:
        np.testing.assert_allclose(multi[k], single[k], atol=1e-5, rtol=0, err_msg=k)


def _train_py(run_dir: pathlib.Path, devices: int, job: dict[str, str]) -> subprocess.Popen:
    """scripts/train.py (SDPO smoke, 2 steps, 2 data-parallel devices) as a job's process."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        **job,
    )
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"),
           f"--config={REPO / 'configs' / 'sdpo.py'}:smoke", f"--config.run_dir={run_dir}",
           "--config.eval_every=0", "--config.total_steps=2", "--config.mesh.data=2"]  # fmt: skip
    return subprocess.Popen(cmd, env=env, cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip


def _summary(proc: subprocess.Popen, name: str) -> dict:
    try:
        out, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, f"{name} failed:\n{out[-4000:]}"
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def test_two_train_py_processes_are_one_job(tmp_path):
    """Two processes x 1 device (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
    as a launcher sets them) train one 2-device mesh (alone, neither would pass mesh.data=2)
    and report the same losses; test_two_processes_equal_single_process checks the step's
    numbers against one process."""
    port = str(_free_port())
    job = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2")
    procs = [_train_py(tmp_path, 1, {**job, "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    losses = [_summary(p, f"process {i}")["losses"] for i, p in enumerate(procs)]
    assert len(losses[0]) == 2 and all(np.isfinite(losses[0]))
    assert losses[0] == losses[1]  # one SPMD step, metrics replicated to both
    # Only process 0 logs; its metrics file holds the job's losses.
    from jaxsd.metrics import read_metrics

    assert [r["loss"] for r in read_metrics(tmp_path) if "loss" in r] == losses[0]
    assert (tmp_path / "checkpoints" / "2").is_dir()  # both processes wrote their shards


def test_the_environment_decides_whether_to_join_a_job():
    from jaxsd.train.mesh import distributed_args

    assert distributed_args({}) is None
    assert distributed_args({"SLURM_NTASKS": "1"}) is None
    explicit = {"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "4",
                "JAX_PROCESS_ID": "3", "JAX_PLATFORMS": "cpu"}  # fmt: skip
    assert distributed_args(explicit) == dict(
        coordinator_address="h:1234", num_processes=4, process_id=3, cpu_collectives="gloo"
    )
    auto = dict(cpu_collectives=None)  # JAX reads the cluster from its own environment
    assert distributed_args({"SLURM_NTASKS": "16"}) == auto
    assert distributed_args({"OMPI_COMM_WORLD_SIZE": "2"}) == auto
    assert distributed_args({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == auto
    assert distributed_args({"JAXSD_DISTRIBUTED": "1"}) == auto
    assert distributed_args({"JAXSD_DISTRIBUTED": "0", "SLURM_NTASKS": "16"}) is None
    with pytest.raises(ValueError, match="JAXSD_DISTRIBUTED"):
        distributed_args({"JAXSD_DISTRIBUTED": "yes"})


if __name__ == "__main__":
    if sys.argv[1] == "single":
        worker_single(pathlib.Path(sys.argv[2]))
    else:
        worker_multi(int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4]))
