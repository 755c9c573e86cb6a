"""The config's logical-axis rules (`mesh.rules`) place parameters, the train batch and the
decoder's residual stream; HF weights load straight into their shards.

The 8-device checks run in one subprocess (XLA_FLAGS must be set before JAX starts; this file
is its entry point) whose JSON answer the tests below read; the pytest process keeps one device.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

HERE = pathlib.Path(__file__).resolve()
REPO = HERE.parents[1]
# A layout unlike the default: tensor parallelism on the model dimension, FSDP on the wide ones,
# the vocabulary replicated, rows over `data` only and the token axis over `fsdp`.
CUSTOM = dict(
    batch="data", length="fsdp", embed="tensor", vocab="", mlp="fsdp", heads="fsdp",
    kv_heads="fsdp", head_dim="", layers="",
)  # fmt: skip


def _config(**rules):
    from tests.test_loop import load_config

    cfg = load_config("sc_sdpo", "smoke")
    cfg.mesh.rules.update(rules)
    return cfg


# ---------------------------------------------------------------- subprocess side


def _spec(x) -> list:
    return [list(e) if isinstance(e, tuple) else e for e in x.sharding.spec]


def _load_report(model_dir: str, rules_table: dict) -> dict:
    """Sharded vs unsharded load of `model_dir` on a (2, 2, 2) mesh under `rules_table`."""
    from flax import nnx

    from jaxsd.models import io
    from jaxsd.models.sharding import logical_axes_of, rules_from_strings
    from jaxsd.train.mesh import make_mesh

    rules = rules_from_strings(rules_table)
    mesh = make_mesh((2, 2, 2))
    ref, _ = io.from_pretrained(model_dir)
    reads: dict[str, list] = {}
    block, getitem = io._TensorSource.block, io._TensorSource.__getitem__

    def logged_block(self, name, index):
        out = block(self, name, index)
        reads.setdefault(name, []).append(list(out.shape))
        return out

    def whole_read(self, name):
        raise AssertionError(f"the sharded loader read the whole tensor {name}")

    io._TensorSource.block, io._TensorSource.__getitem__ = logged_block, whole_read
    try:
        model, _ = io.from_pretrained(model_dir, mesh=mesh, rules=rules)
    finally:
        io._TensorSource.block, io._TensorSource.__getitem__ = block, getitem
    ref_flat = dict(nnx.to_flat_state(nnx.state(ref, nnx.Param)))
    leaves = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        x = var[...]
        leaves[".".join(map(str, path))] = dict(
            hf=io.hf_name(path),
            kernel=path[-1] == "kernel",
            axes=list(logical_axes_of(var)),
            shape=list(x.shape),
            spec=_spec(x),
            equal=bool(np.array_equal(np.asarray(x), np.asarray(ref_flat[path][...]))),
            shard_shapes=sorted({tuple(s.data.shape) for s in x.addressable_shards}),
            expected_shard=list(x.sharding.shard_shape(x.shape)),
            devices=len(x.sharding.device_set),
        )
    return dict(leaves=leaves, reads=reads, model=model, mesh=mesh, ref=ref)


def _constraints(model, mesh) -> dict:
    """Sharding constraints in the decoder's jaxpr, and its logits against one device."""
    from flax import nnx
    from jax.sharding import NamedSharding

    graphdef, state = nnx.split(model)
    ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (4, 8))
    hidden = lambda s, x: nnx.merge(graphdef, s).hidden_states(x)  # noqa: E731
    ids_sh = jax.device_put(ids, NamedSharding(mesh, P(("data", "fsdp"), None)))
    jaxpr = str(jax.make_jaxpr(hidden)(state, ids_sh))
    out = np.asarray(jax.jit(hidden)(state, ids_sh))
    return dict(n_constraints=jaxpr.count("sharding_constraint"), hidden=out.tolist())


def _batch_specs(rules_table: dict) -> dict:
    from jaxsd.models.sharding import rules_from_strings
    from jaxsd.train.batch import batch_shardings
    from jaxsd.train.mesh import make_mesh

    shardings = batch_shardings(make_mesh((2, 2, 2)), rules_from_strings(rules_table))
    return {f: [list(e) if isinstance(e, tuple) else e for e in s.spec] for f, s in
            zip(shardings._fields, shardings, strict=True)}  # fmt: skip


def _subprocess_main(model_dir: str) -> None:
    from flax import nnx

    from jaxsd.models.sharding import DEFAULT_RULES, rules_to_strings

    out = {"devices": jax.device_count()}
    for label, table in (("default", rules_to_strings(DEFAULT_RULES)), ("custom", CUSTOM)):
        report = _load_report(model_dir, table)
        out[label] = dict(leaves=report["leaves"], reads=report["reads"])
        out[label]["batch"] = _batch_specs(table)
        out[label].update(_constraints(report["model"], report["mesh"]))
    # The same sharded params in a model without rules: no constraint, same numbers.
    graphdef, state = nnx.split(report["model"])
    plain = nnx.merge(nnx.split(report["ref"])[0], state)
    out["unconstrained"] = _constraints(plain, report["mesh"])
    print(json.dumps(out))


# ---------------------------------------------------------------- pytest side


@pytest.fixture(scope="module")
def on_8_devices(tiny_model_dir):
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(HERE), str(tiny_model_dir)],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["devices"] == 8
    return res


EXPECTED_PARAM_SPECS = {
    # name: (default rules, CUSTOM rules) on the (data, fsdp, tensor) = (2, 2, 2) mesh
    "layers.0.self_attn.q_proj.kernel": (["fsdp", "tensor"], ["tensor", "fsdp"]),
    "layers.0.self_attn.k_proj.kernel": (["fsdp", "tensor"], ["tensor", "fsdp"]),
    "layers.0.self_attn.o_proj.kernel": (["tensor", "fsdp"], ["fsdp", "tensor"]),
    "layers.1.mlp.down_proj.kernel": (["tensor", "fsdp"], ["fsdp", "tensor"]),
    "embed_tokens": (["tensor", "fsdp"], [None, "tensor"]),
    "lm_head.kernel": (["fsdp", "tensor"], ["tensor", None]),
    "norm.weight": (["fsdp"], ["tensor"]),
    "layers.0.self_attn.q_norm.weight": ([None], [None]),
}


@pytest.mark.parametrize("label", ["default", "custom"])
def test_rules_place_each_param_and_the_loader_puts_it_there(on_8_devices, label):
    leaves = on_8_devices[label]["leaves"]
    column = 0 if label == "default" else 1
    for name, specs in EXPECTED_PARAM_SPECS.items():
        assert leaves[name]["spec"] == specs[column], name
    for name, leaf in leaves.items():
        assert leaf["equal"], f"{name}: sharded load differs from the unsharded one"
        assert leaf["devices"] == 8, name
        # Every device holds exactly its block, never more.
        assert leaf["shard_shapes"] == [leaf["expected_shard"]], name


def test_sharded_loader_reads_blocks_never_whole_sharded_tensors(on_8_devices):
    for label in ("default", "custom"):
        leaves, reads = on_8_devices[label]["leaves"], on_8_devices[label]["reads"]
        for leaf in leaves.values():
            shape, blocks = leaf["shape"], reads[leaf["hf"]]
            hf_shard = leaf["expected_shard"][::-1] if leaf["kernel"] else leaf["expected_shard"]
            # Each distinct block is read once (replicas share it), in the file's layout.
            assert all(b == hf_shard for b in blocks), (leaf["hf"], blocks, hf_shard)
            shards = int(np.prod(shape)) // int(np.prod(leaf["expected_shard"]))
            assert len(blocks) == shards, (leaf["hf"], len(blocks), shards)


def test_batch_shardings_follow_the_batch_and_length_rules(on_8_devices):
    default, custom = on_8_devices["default"]["batch"], on_8_devices["custom"]["batch"]
    assert default["student_tokens"] == [["data", "fsdp"], None]
    assert default["advantage"] == [["data", "fsdp"]]
    assert custom["student_tokens"] == ["data", "fsdp"]
    assert custom["teacher_mask"] == ["data", "fsdp"]
    assert custom["advantage"] == ["data"]


def test_decoder_constrains_its_residual_stream_on_a_mesh(on_8_devices):
    layers = 2  # the tiny model: the embedding output and every layer's output
    for label in ("default", "custom"):
        assert on_8_devices[label]["n_constraints"] == layers + 1, label
    assert on_8_devices["unconstrained"]["n_constraints"] == 0
    ref = np.asarray(on_8_devices["unconstrained"]["hidden"])
    for label in ("default", "custom"):
        np.testing.assert_allclose(np.asarray(on_8_devices[label]["hidden"]), ref, atol=1e-5)


def test_one_device_mesh_adds_no_constraint(tiny_model_dir):
    from flax import nnx

    from jaxsd.models import from_pretrained
    from jaxsd.train.mesh import make_mesh

    model, _ = from_pretrained(tiny_model_dir, mesh=make_mesh((1, 1, 1)))
    ref, _ = from_pretrained(tiny_model_dir)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 1024, (2, 6)))
    assert "sharding_constraint" not in str(jax.make_jaxpr(lambda: model.hidden_states(ids))())
    a, b = nnx.state(model, nnx.Param), nnx.state(ref, nnx.Param)
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))
    np.testing.assert_array_equal(model(ids), ref(ids))


def test_engine_model_is_taken_from_the_trainer_state(tiny_model_dir):
    import optax
    from flax import nnx

    from jaxsd.models import LoraConfig, from_pretrained
    from jaxsd.models.lora import trainable_filter
    from jaxsd.train.rollout_worker import engine_model, engine_params_fn
    from jaxsd.train.state import train_state_from_model

    lora = LoraConfig(rank=2, alpha=4.0)
    trainer, config = from_pretrained(tiny_model_dir, lora=lora, remat=True)
    graphdef, state, _ = train_state_from_model(
        trainer, optax.sgd(0.1), trainable=trainable_filter(lora)
    )
    params_fn = engine_params_fn(graphdef, lora)  # W + (alpha/r) A B with B = 0: W
    engine = engine_model("jax", config, params_fn, state)
    assert not engine.config.remat and not list(nnx.to_flat_state(nnx.state(engine, nnx.LoRAParam)))
    shapes = engine_model("vllm", config, params_fn, state)  # vLLM reads its own copy
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(shapes)))
    ref, _ = from_pretrained(tiny_model_dir)
    for x in jax.tree.leaves((state.params, state.frozen)):
        x.delete()  # the state is donated to the step: the engine has buffers of its own
    ids = jnp.asarray(np.random.RandomState(2).randint(0, 1024, (2, 5)))
    np.testing.assert_array_equal(engine(ids), ref(ids))


def test_build_reads_the_checkpoint_once_with_the_config_rules(tmp_path, monkeypatch):
    from flax import nnx

    from jaxsd.models import io
    from jaxsd.train.build import build

    reads: dict[str, int] = {}
    block = io._TensorSource.block

    def counted(self, name, index):
        reads[name] = reads.get(name, 0) + 1
        return block(self, name, index)

    monkeypatch.setattr(io._TensorSource, "block", counted)
    cfg = _config(embed="", length="tensor")
    cfg.run_dir = str(tmp_path / "run")
    run = build(cfg)
    try:
        learner = run.learner
        assert reads and set(reads.values()) == {1}  # every tensor read once, for the trainer
        q = learner.state_shardings.params["layers"][0]["self_attn"]["q_proj"]["kernel"]
        assert jax.tree.leaves(q)[0].spec == P(None, "tensor")
        assert learner.batch_shardings.student_tokens.spec == P(("data", "fsdp"), "tensor")
        trained = nnx.merge(learner.graphdef, learner.state.params)
        assert trained.mesh_rules.rules == run.settings.rules
        engine = run.worker.engine.model
        assert engine.mesh_rules is None  # the single-device sampler constrains nothing
        ours = dict(nnx.to_flat_state(nnx.state(engine, nnx.Param)))
        for path, var in nnx.to_flat_state(learner.state.params):
            np.testing.assert_array_equal(ours[path][...], var[...])
            assert ours[path][...].unsafe_buffer_pointer() != var[...].unsafe_buffer_pointer()
    finally:
        run.close()


def _q_spec(state, mesh, rules) -> P:
    from jaxsd.models.sharding import param_shardings

    q_state = state["layers"][0]["self_attn"]["q_proj"]["kernel"]
    return jax.tree.leaves(param_shardings(q_state, mesh, rules))[0].spec


def test_config_rules_reach_param_and_batch_specs():
    from flax import nnx

    from jaxsd.models import ModelConfig, Transformer
    from jaxsd.models.sharding import DEFAULT_RULES
    from jaxsd.train.batch import batch_shardings
    from jaxsd.train.mesh import make_mesh
    from jaxsd.train.validate import mesh_rules

    mesh = make_mesh((1, 1, 1))  # size-1 axes keep their names in the specs
    default, custom = mesh_rules(_config()), mesh_rules(_config(**CUSTOM))
    assert default == DEFAULT_RULES  # the config's table is today's default
    assert batch_shardings(mesh, default).student_tokens.spec == P(("data", "fsdp"), None)
    assert batch_shardings(mesh, custom).student_tokens.spec == P("data", "fsdp")
    assert batch_shardings(mesh, custom).advantage.spec == P("data")
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8)  # fmt: skip
    state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    assert _q_spec(state, mesh, default) == P("fsdp", "tensor")
    assert _q_spec(state, mesh, custom) == P("tensor", "fsdp")


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (dict(experts="tensor"), "mesh.rules.experts is not a logical axis"),
        (dict(embed="fsdpp"), r"mesh.rules.embed='fsdpp': no mesh axis 'fsdpp'"),
        (dict(batch="data,data"), "mesh.rules.batch='data,data' names a mesh axis twice"),
        (dict(mlp=3), "mesh.rules.mlp=3 is invalid"),
    ],
)
def test_bad_rules_name_the_key(rules, message):
    from jaxsd.train.validate import validate_config

    cfg = _config()
    with cfg.mesh.rules.ignore_type():
        cfg.mesh.rules.update(rules)
    with pytest.raises(ValueError, match=message):
        validate_config(cfg)


def test_missing_rule_and_batch_rule_divisibility_are_errors():
    from jaxsd.train.validate import validate_config

    cfg = _config()
    del cfg.mesh.rules["vocab"]
    with pytest.raises(ValueError, match=r"mesh.rules has no rule for \['vocab'\]"):
        validate_config(cfg)
    cfg = _config(batch="tensor")  # smoke: 2 questions x 4 rollouts = 8 rows
    cfg.mesh.update(data=1, fsdp=1, tensor=3)
    with pytest.raises(ValueError, match="not divisible by mesh.tensor = 3"):
        validate_config(cfg, num_devices=3)


@pytest.mark.parametrize(("tensor", "fsdp", "bad"), [(3, 1, 3), (2, 16, 32), (2, 8, None)])
def test_a_length_rule_must_split_every_padded_length(tensor, fsdp, bad):
    """Padded lengths are powers of two from 16: 3 or 32 shards cannot split them, 16 can."""
    from jaxsd.train.validate import validate_config

    cfg = _config(length="tensor,fsdp", batch="data")
    cfg.mesh.update(data=1, fsdp=fsdp, tensor=tensor)
    if bad is None:
        validate_config(cfg, num_devices=tensor * fsdp)
        return
    with pytest.raises(ValueError, match=rf"mesh.rules.length='tensor,fsdp' .* = {bad} shards"):
        validate_config(cfg, num_devices=tensor * fsdp)


if __name__ == "__main__":
    _subprocess_main(sys.argv[1])
