"""Mesh and logical-axis rules; on a fake 8-device CPU mesh (subprocess): the sharding of every parameter and
optimiser leaf, FSDP's per-device train-state memory, and one step's loss on 1 device / 8 DP / 8 FSDP."""

from __future__ import annotations

import json

import ml_collections
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from deltaworld_jax import sharding
from test_trainer import check, run_python


def test_mesh_shape_fills_minus_one_and_rejects_bad_shapes():
    assert sharding.resolve_mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 8) == (8, 1, 1)
    assert sharding.resolve_mesh_shape({"data": 1, "fsdp": -1, "tensor": 2}, 8) == (1, 4, 2)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="not divisible by 3"):
        sharding.resolve_mesh_shape({"data": -1, "tensor": 3}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.resolve_mesh_shape({"model": 2}, 8)


def test_logical_rules_map_names_to_mesh_axes():
    mesh = AbstractMesh((1, 4, 2), sharding.MESH_AXES)
    from configs import common

    rules = common.MESH_RULES
    assert sharding.logical_to_spec(("embed", "mlp"), (32, 64), rules, mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("heads", "embed"), (32, 32), rules, mesh) == P("tensor", "fsdp")
    assert sharding.logical_to_spec(("norm",), (32,), rules, mesh) == P(None)
    # 12 heads do not split over tensor=8 -> replicated; a mesh axis is never used twice in one spec
    mesh8 = AbstractMesh((1, 1, 8), sharding.MESH_AXES)
    assert sharding.logical_to_spec(("embed", "heads"), (32, 12), rules, mesh8) == P(None, None)
    assert sharding.logical_to_spec(("embed", "embed"), (32, 32), rules, mesh) == P("fsdp", None)
    with pytest.raises(ValueError, match="logical axis 'experts' has no rule"):
        sharding.logical_to_spec(("experts",), (4,), rules, mesh, "moe/kernel")
    cfg = ml_collections.ConfigDict({"shape": {"data": -1}, "rules": [("embed", "bogus")]})
    with pytest.raises(ValueError, match="unknown mesh axis 'bogus'"):
        sharding.axis_rules(cfg)
    with pytest.raises(ValueError, match="config.mesh.rules is empty"):
        sharding.axis_rules(ml_collections.ConfigDict({"shape": {"data": -1}, "rules": ()}))


def test_multi_slice_puts_the_data_axis_across_slices():
    from types import SimpleNamespace

    # (platform "cpu": mesh_utils then lays out each slice without physical TPU coordinates)
    devices = [SimpleNamespace(id=i, slice_index=i // 4, platform="cpu", device_kind="cpu", process_index=i // 4)
               for i in range(8)]
    array = sharding.device_array((2, 4, 1), devices)
    ids = [[d.id for d in row.ravel()] for row in array]
    assert ids == [[0, 1, 2, 3], [4, 5, 6, 7]]  # data index = slice; fsdp within a slice
    with pytest.raises(ValueError, match="span 2 slices: the data axis \\(1\\) must be a multiple"):
        sharding.device_array((1, 8, 1), devices)
    assert sharding.device_array((8, 1, 1), devices[:4]) is None  # one slice: jax.make_mesh decides


EIGHT_DEVICE_CHECKS = r"""
import json
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
import test_trainer as T
from deltaworld_jax import sharding
from deltaworld_jax.training import trainer, train_step as step_lib

out = {}
config = T.toy_config(**{"model.width": 64})
batch_np = next(T.toy_data(config, process_index=0, process_count=1))
inputs = batch_np

def layout(shape):
    cfg = T.toy_config(**{"mesh.shape": shape, "model.width": 64})
    return cfg

def setup_for(shape, devices):
    cfg = layout(shape)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    return cfg, trainer.build(cfg, mesh)

def init_compiled(s):
    # the trainer's sharded init, compiled once: XLA's memory analysis, then the state itself
    fresh = lambda: step_lib.init_train_state(*step_lib.split_trainable(s.task.build_trainable(nnx.Rngs(0)))[1:],
                                              s.tx)
    with jax.set_mesh(s.mesh):
        compiled = jax.jit(fresh, out_shardings=s.state_shardings).lower().compile()
        return compiled.memory_analysis().output_size_in_bytes, compiled()

def check_specs(s, state):
    # every parameter's spec is the rules' spec for its logical axes; Adam moments follow their parameter
    abstract_module = nnx.eval_shape(lambda: s.task.build_trainable(nnx.Rngs(0)))
    flat_vars = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(abstract_module, nnx.Param))}
    bad, specs = [], {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        key = tuple(str(getattr(k, "key", k)) for k in path)
        var = flat_vars[key]
        expected = sharding.logical_to_spec(var.get_metadata().get("out_sharding"), var.shape, s.rules, s.mesh)
        specs["/".join(key)] = str(leaf.sharding.spec)
        if leaf.sharding.spec != expected:
            bad.append(("param", key, str(leaf.sharding.spec), str(expected)))
    adam = [x for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(x, optax.ScaleByAdamState)][0]
    for moments in (adam.mu, adam.nu):
        for (path, m), p in zip(jax.tree_util.tree_leaves_with_path(moments), jax.tree.leaves(state.params)):
            if m.sharding.spec != p.sharding.spec:
                bad.append(("moment", str(path), str(m.sharding.spec), str(p.sharding.spec)))
    for leaf in jax.tree.leaves(state.opt_state):
        if leaf.ndim == 0 and leaf.sharding.spec != jax.sharding.PartitionSpec():
            bad.append(("scalar", str(leaf.sharding.spec)))
    frozen = {"/".join(str(getattr(k, "key", k)) for k in p): str(v.sharding.spec)
              for p, v in jax.tree_util.tree_leaves_with_path(s.frozen_state)}
    return bad, specs, frozen

losses, kernels, state_bytes = {}, {}, {}
for name, shape, devices in [("one", {"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
                             ("dp8", {"data": 8, "fsdp": 1, "tensor": 1}, jax.devices()),
                             ("fsdp8", {"data": 1, "fsdp": 8, "tensor": 1}, jax.devices()),
                             ("fsdp4_tp2", {"data": 1, "fsdp": 4, "tensor": 2}, jax.devices())]:
    cfg, s = setup_for(shape, devices)
    state_bytes[name], state = init_compiled(s)
    if name == "fsdp4_tp2":  # 1) the layout with every kind of split: specs of all leaves
        out["bad"], out["specs"], out["frozen_specs"] = check_specs(s, state)
        continue
    # 3) one training step: the same loss (and update) on 1 device, 8 devices DP, 8 devices FSDP
    fn = step_lib.make_train_step(s.task, s.graphdef, s.frozen_graphdef, s.tx, mesh=s.mesh, lr_schedule=s.schedule)
    with jax.set_mesh(s.mesh):
        batch = trainer.place_batch(inputs, s.mesh)
        jitted = step_lib.jit_train_step(fn, s.state_shardings, s.frozen_shardings,
                                         jax.tree.map(lambda x: x.sharding, batch), s.mesh)
        state, m1 = jitted(state, s.frozen_state, batch, jax.random.PRNGKey(1))
    losses[name] = [float(m1["loss"]), float(m1["grad_norm/total"])]
    kernels[name] = np.asarray(state.params["head"]["kernel"]).ravel()[:16].tolist()
# 2) per-device bytes of the train state (compiled init's output): replicated (DP over 8) vs FSDP over 8
out["bytes_replicated"], out["bytes_fsdp"] = state_bytes["dp8"], state_bytes["fsdp8"]
out["losses"], out["kernels"] = losses, kernels
print("RESULT" + json.dumps(out))
"""


# The tests reading eight_device_results run on one xdist worker, so its 8-device subprocess runs once (split
# over both workers, each ran it: 15 s more).
ON_ONE_WORKER = pytest.mark.xdist_group("eight_device_results")


@pytest.fixture(scope="module")
def eight_device_results():
    proc = check(run_python(EIGHT_DEVICE_CHECKS, devices=8, timeout=600))
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@ON_ONE_WORKER
def test_every_param_and_optimizer_leaf_follows_the_rules(eight_device_results):
    r = eight_device_results
    assert r["bad"] == []
    specs = r["specs"]
    assert specs["block/mlp/up_proj/kernel"] == str(P("fsdp", "tensor"))
    assert specs["block/mlp/down_proj/kernel"] == str(P("tensor", "fsdp"))
    assert specs["block/norm1/weight"] == str(P(None))
    assert specs["token"] == str(P(None, "fsdp"))
    # the frozen module is placed by the same rules
    assert r["frozen_specs"]["patch_embed/kernel"] == str(P(None, "fsdp"))


@ON_ONE_WORKER
def test_fsdp_cuts_per_device_train_state_memory(eight_device_results):
    r = eight_device_results
    print(f"per-device train-state bytes: replicated {r['bytes_replicated']}, FSDP(8) {r['bytes_fsdp']} "
          f"(ratio {r['bytes_fsdp'] / r['bytes_replicated']:.3f})")
    assert r["bytes_fsdp"] <= r["bytes_replicated"] / 6


@ON_ONE_WORKER
def test_one_step_loss_is_layout_independent(eight_device_results):
    losses, kernels = eight_device_results["losses"], eight_device_results["kernels"]
    import numpy as np

    for name in ("dp8", "fsdp8"):
        np.testing.assert_allclose(losses[name], losses["one"], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(kernels[name], kernels["one"], rtol=1e-4, atol=1e-6, err_msg=name)
    assert losses["one"][1] > 0  # gradients flowed


def test_scanned_blocks_keep_activations_split_by_batch_under_fsdp():
    """On a 4-device FSDP mesh (weights' `embed` dims split over fsdp), run_blocks keeps the residual stream
    split by batch (sharding.constrain_batch), whatever the partitioner would pick from the weights; the
    constraint leaves arrays alone without a mesh or when the batch does not divide, and the stack's
    result is the same as without a mesh."""
    code = """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from deltaworld_jax import sharding
    from deltaworld_jax.models import block_stack, blocks

    mesh = sharding.make_mesh(type("M", (), {"shape": {"data": 1, "fsdp": 4, "tensor": 1}})())
    cfg = blocks.BlockConfig(blocks.AttentionConfig(hidden_size=32, num_heads=4), intermediate_size=64)
    stack = block_stack.BlockStack(2, lambda r: blocks.Block(cfg, rngs=r), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(stack)
    x = jax.random.normal(jax.random.key(1), (8, 5, 32))
    expected = block_stack.run_blocks(stack, x)  # no mesh in context: plain arrays
    # weights split on their embed (first non-layer) dim over fsdp, the input split on its width
    state = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P(None, "fsdp") if a.ndim >= 3 else P())), state)
    x_wide = jax.device_put(x, NamedSharding(mesh, P(None, None, "fsdp")))

    @jax.jit
    def run(state, x):
        return block_stack.run_blocks(nnx.merge(graphdef, state), x)

    with jax.set_mesh(mesh):
        out = run(state, x_wide)
        odd = jax.jit(sharding.constrain_batch)(jnp.ones((6, 3)))  # 6 examples over 4 devices: left alone
    print(json.dumps({"out": out.sharding.spec[0], "odd": list(odd.sharding.spec),
                      "err": float(np.max(np.abs(np.asarray(out) - np.asarray(expected)))),
                      "no_mesh_same": sharding.constrain_batch(x) is x}))
    """
    r = json.loads(check(run_python(code, devices=4)).stdout.strip().splitlines()[-1])
    assert r["out"] == "fsdp"
    assert all(s is None for s in r["odd"])
    assert r["no_mesh_same"]
    assert r["err"] < 1e-5, r
