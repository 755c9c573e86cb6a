"""Logical-axis sharding rules, and a model sharded over 8 simulated devices gives the same logits.

The 8-device run is a subprocess (XLA_FLAGS must be set before JAX starts, and the rest of the
suite runs on one device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from jaxsd.models import LoraConfig, ModelConfig, Transformer
from jaxsd.models.sharding import (
    DEFAULT_RULES,
    logical_axes_of,
    logical_to_mesh_spec,
    param_shardings,
)

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8,
)  # fmt: skip


def test_default_rules_give_the_expected_specs():
    assert logical_to_mesh_spec(("embed", "heads")) == P("fsdp", "tensor")
    assert logical_to_mesh_spec(("heads", "embed")) == P("tensor", "fsdp")
    assert logical_to_mesh_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_to_mesh_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert logical_to_mesh_spec(("head_dim",)) == P(None)
    assert logical_to_mesh_spec(("batch", "length")) == P(("data", "fsdp"), None)
    # A mesh axis is used once: batch takes fsdp, so embed on the same array is replicated.
    assert logical_to_mesh_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([n for n, _ in DEFAULT_RULES] + [None]), max_size=5))
def test_specs_have_one_entry_per_dim_and_no_repeated_mesh_axis(names):
    spec = logical_to_mesh_spec(names)
    assert len(spec) == len(names)
    flat = [a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)]
    assert len(flat) == len(set(flat))
    assert set(flat) <= {"data", "fsdp", "tensor"}


def test_unknown_logical_axis_is_named():
    try:
        logical_to_mesh_spec(("embed", "experts"))
    except ValueError as e:
        assert "experts" in str(e)
    else:
        raise AssertionError("an unknown logical axis must raise")


def test_every_param_has_logical_axes_of_its_rank():
    model = nnx.eval_shape(
        lambda: Transformer(CFG, rngs=nnx.Rngs(0), lora=LoraConfig(rank=2, alpha=4.0))
    )
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert any(isinstance(v, nnx.LoRAParam) for _, v in flat)
    for path, var in flat:
        axes = logical_axes_of(var)
        assert axes is not None and len(axes) == len(var.shape), path
    by_name = {".".join(map(str, p)): logical_axes_of(v) for p, v in flat}
    assert by_name["layers.0.self_attn.k_proj.kernel"] == ("embed", "kv_heads")
    assert by_name["layers.0.mlp.down_proj.lora_b"] == (None, "embed")
    assert by_name["embed_tokens"] == ("vocab", "embed")


def test_param_shardings_on_one_device_mesh_drop_absent_axes():
    mesh = jax.make_mesh((1,), ("data",))
    state = nnx.state(nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0))), nnx.Param)
    shardings = param_shardings(state, mesh)
    specs = [s.spec for s in jax.tree.leaves(shardings)]
    assert len(specs) == len(jax.tree.leaves(state))
    assert all(all(e is None for e in spec) for spec in specs)


_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from jaxsd.models import ModelConfig, Transformer
    from jaxsd.models.sharding import logical_to_mesh_spec, param_shardings, shard_state

    cfg = ModelConfig(**json.loads({cfg!r}))
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(3)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        noise = 0.2 * rng.standard_normal(var.shape).astype(np.float32)
        var.set_value(jnp.asarray(1.0 + noise if "norm" in "".join(map(str, path)) else noise))
    graphdef, state = nnx.split(model)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 8))
    mask = np.ones((4, 8), np.int32)
    mask[1, :3] = 0
    fwd = lambda s, x, m: nnx.merge(graphdef, s)(x, m)
    ref = np.asarray(jax.jit(fwd)(state, ids, mask))

    # Auto axes: GSPMD propagates the parameter shardings through the model (jax 0.10's
    # make_mesh defaults to Explicit axes, under which the embedding gather is ambiguous).
    auto = (jax.sharding.AxisType.Auto,) * 3
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=auto)
    sharded = shard_state(state, mesh)
    batch = NamedSharding(mesh, logical_to_mesh_spec(("batch", "length"), mesh=mesh))
    out = jax.jit(fwd)(sharded, jax.device_put(ids, batch), jax.device_put(mask, batch))
    q = sharded["layers"][0]["self_attn"]["q_proj"]["kernel"][...]

    # Explicit axes (jax.make_mesh's default): forward and a KV-cache prefill still agree.
    mesh_e = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    sharded_e = shard_state(state, mesh_e)
    batch_e = NamedSharding(mesh_e, logical_to_mesh_spec(("batch", "length"), mesh=mesh_e))
    ids_e, mask_e = jax.device_put(ids, batch_e), jax.device_put(mask, batch_e)
    out_e = jax.jit(fwd)(sharded_e, ids_e, mask_e)
    cache = model.init_cache(4, 10)
    cache_sh = NamedSharding(mesh_e, logical_to_mesh_spec(("batch",), mesh=mesh_e))
    cache = {{**cache, "k": jax.device_put(cache["k"], cache_sh),
              "v": jax.device_put(cache["v"], cache_sh)}}
    cmask = jax.device_put(np.concatenate([mask, np.zeros((4, 2), np.int32)], 1), batch_e)
    pos = jax.device_put(np.maximum(mask.cumsum(-1) - 1, 0), batch_e)
    dec = lambda s, x, p, c, m: nnx.merge(graphdef, s).decode(x, p, c, m)
    out_d, _ = jax.jit(dec)(sharded_e, ids_e, pos, cache, cmask)
    real = mask.astype(bool)
    print(json.dumps(dict(
        devices=jax.device_count(),
        max_diff=float(np.abs(np.asarray(out) - ref).max()),
        explicit_diff=float(np.abs(np.asarray(out_e) - ref).max()),
        decode_diff=float(np.abs(np.asarray(out_d) - ref)[real].max()),
        q_spec=[str(a) for a in q.sharding.spec],
        q_shard=list(q.addressable_shards[0].data.shape),
        q_shape=list(q.shape),
    )))
    """
)


def test_model_sharded_on_8_devices_gives_same_logits():
    cfg_json = json.dumps({k: v for k, v in CFG.__dict__.items()})
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(cfg=cfg_json)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["devices"] == 8
    assert res["q_spec"] == ["fsdp", "tensor"]
    assert res["q_shard"] == [res["q_shape"][0] // 2, res["q_shape"][1] // 2]
    assert res["max_diff"] <= 1e-5
    assert res["explicit_diff"] <= 1e-5
    assert res["decode_diff"] <= 1e-4
    assert np.isfinite(res["max_diff"])
