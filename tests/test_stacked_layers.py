"""Blocks stored stacked (block_stack.BlockStack; the model configs' `scan_layers`) against the per-layer layout:
the same forward pass and the same gradients for every family (fp32), with and without remat; official
weights (DeltaTok / DeltaWorld state dicts, a `transformers` DINOv3 folder) load into both layouts through
the one weight map, strictly, and export back unchanged; our Orbax runs of a stacked model are read by the
forecast; on a 4-device mesh the stacked parameters keep their per-layer shardings behind an unsharded
'layers' axis."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import check_env
from deltaworld_jax.models import block_stack, blocks
from deltaworld_jax.models.deltatok import DeltaTok, DeltaTokConfig
from deltaworld_jax.models.deltaworld import DeltaWorld, DeltaWorldConfig
from deltaworld_jax.models.dinov3 import DINOv3, DINOv3Config
from deltaworld_jax.models.predictor import Predictor, PredictorConfig
from deltaworld_jax.pretrained import common
from deltaworld_jax.pretrained.deltatok import DELTATOK_TABLE, load_deltatok
from deltaworld_jax.pretrained.world import load_deltaworld, world_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPTH = 3
TIGHT = dict(rtol=1e-6, atol=1e-6)
# The two layouts run different programs (per-layer blocks unrolled, stacked ones as one scan), so their
# outputs agree to float32 rounding, not bit for bit; the weights themselves must agree exactly.
SAME_FORWARD = dict(rtol=1e-5, atol=1e-6)


def _flat(state) -> dict[str, np.ndarray]:
    return {common.path_to_str(p): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
            for p, v in nnx.to_flat_state(state)}


def _as_stacked(per_layer: nnx.Module, build_stacked) -> nnx.Module:
    """`build_stacked()` (a stacked model of the same sizes) filled with the per-layer model's weights
    through the importers' own fill (layer i -> index i)."""
    return common.fill_abstract_model(nnx.eval_shape(build_stacked), common.model_params(per_layer))


def _assert_same(per_layer: dict, stacked: dict, what: str, **tol) -> None:
    """`stacked` ({path: array}, stacked paths) equals `per_layer` once split per layer."""
    unstacked = common.unstack_layers(stacked)
    assert unstacked.keys() == per_layer.keys(), what
    for key in per_layer:
        np.testing.assert_allclose(unstacked[key], per_layer[key], err_msg=f"{what}: {key}", **(tol or TIGHT))


def _value_and_grads(model, loss_fn):
    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    return np.asarray(loss), _flat(grads)


# ---- the stacked stack itself against a Python loop over per-layer blocks ---------------------------------

BLOCK = blocks.BlockConfig(blocks.AttentionConfig(32, 2, qk_norm=True, output_gate=True), 48, gated_mlp=True,
                           act="silu", layer_scale_init=0.5)


def test_block_stack_is_stacked_per_layer_init_with_a_layers_axis():
    stack = block_stack.BlockStack(DEPTH, lambda r: blocks.Block(BLOCK, rngs=r), rngs=nnx.Rngs(0))
    assert len(stack) == DEPTH
    kernel = stack.stacked.mlp.up_proj.kernel
    assert kernel.shape == (DEPTH, 32, 48)
    assert kernel.get_metadata()["out_sharding"] == (block_stack.LAYER_AXIS, "embed", "mlp")
    assert stack.stacked.norm1.weight.get_metadata()["out_sharding"] == (block_stack.LAYER_AXIS, "norm")
    # every layer drew its own random init (split rngs), not one init repeated
    assert not np.allclose(kernel.get_value()[0], kernel.get_value()[1])
    with pytest.raises(ValueError, match="at least one layer"):
        block_stack.BlockStack(0, lambda r: blocks.Block(BLOCK, rngs=r), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("remat", ["none", "full", "auto"])
def test_scanned_stack_equals_the_unrolled_blocks_forward_and_gradient(remat):
    stack = block_stack.BlockStack(DEPTH, lambda r: blocks.Block(BLOCK, rngs=r), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(stack.stacked)
    unrolled = [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state)) for i in range(DEPTH)]
    x = jax.random.normal(jax.random.key(1), (2, 9, 32))

    def scanned_loss(stack, x):
        return jnp.sum(block_stack.run_blocks(stack, x, remat=remat) ** 2)

    def unrolled_loss(blocks, x):
        for block in blocks:
            x = block(x)
        return jnp.sum(x ** 2)

    loss_s, grads_s = jax.jit(jax.value_and_grad(scanned_loss, argnums=(0, 1)))(stack, x)
    loss_u, grads_u = jax.jit(jax.value_and_grad(unrolled_loss, argnums=(0, 1)))(nnx.List(unrolled), x)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    np.testing.assert_allclose(grads_s[1], grads_u[1], rtol=1e-5, atol=1e-6)  # input gradient
    per_layer = {f"blocks.{i}.{k}": v for i in range(DEPTH) for k, v in _flat(nnx.state(grads_u[0][i])).items()}
    stacked = {f"blocks.{block_stack.STACKED}.{k}": v
               for k, v in _flat(nnx.state(grads_s[0])[block_stack.STACKED]).items()}
    _assert_same(per_layer, stacked, f"parameter gradients, remat={remat}", rtol=1e-5, atol=1e-6)


# ---- every family: stacked model == per-layer model, forward and gradient ---------------------------------


def _deltatok_config(**kw) -> DeltaTokConfig:
    return DeltaTokConfig(hidden_size=32, num_layers=DEPTH, num_heads=2, intermediate_size=48, **kw)


@pytest.mark.parametrize("remat", ["none", "full", "auto"])
def test_deltatok_stacked_equals_per_layer(remat):
    cfg = _deltatok_config(remat=remat, layer_scale_init=0.5)
    per_layer = DeltaTok(cfg, rngs=nnx.Rngs(0))
    stacked = _as_stacked(per_layer, lambda: DeltaTok(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(0)))
    x, y = jax.random.normal(jax.random.key(1), (2, 2, 16, 32))
    rope = per_layer.rope((4, 4), jax.random.key(2))

    def loss(model):
        return jnp.sum(model.decode(model.encode(x, y, rope), x, rope) ** 2)

    loss_p, grads_p = _value_and_grads(per_layer, loss)
    loss_s, grads_s = _value_and_grads(stacked, loss)
    np.testing.assert_allclose(loss_s, loss_p, **TIGHT)
    _assert_same(grads_p, grads_s, f"DeltaTok gradients, remat={remat}")


@pytest.mark.parametrize("remat", ["none", "full", "auto"])
def test_predictor_stacked_equals_per_layer(remat):
    cfg = PredictorConfig(hidden_size=32, num_layers=DEPTH, num_heads=2, backbone_hidden_size=24, mlp_ratio=2,
                          rope_axis_sizes=(12,), rope_unrotated_size=4, layer_scale_init=0.5, remat=remat)
    per_layer = Predictor(cfg, rngs=nnx.Rngs(0))
    stacked = _as_stacked(per_layer, lambda: Predictor(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(0)))
    k1, k2 = jax.random.split(jax.random.key(1))
    queries, kv = jax.random.normal(k1, (2, 4, 32)), jax.random.normal(k2, (2, 6, 24))
    pos_q, pos_k = (jnp.tile(jnp.arange(4.0), (2, 1)),), (jnp.tile(jnp.arange(6.0), (2, 1)),)
    mask = jnp.tril(jnp.ones((4, 6), bool), k=2)[None, None]

    def loss(model):
        return jnp.sum(model(queries, kv, pos_q, pos_k, mask) ** 2)

    loss_p, grads_p = _value_and_grads(per_layer, loss)
    loss_s, grads_s = _value_and_grads(stacked, loss)
    np.testing.assert_allclose(loss_s, loss_p, **TIGHT)
    _assert_same(grads_p, grads_s, f"predictor gradients, remat={remat}")


def test_dinov3_stacked_equals_per_layer():
    """The frozen VFM has no remat option (it is never differentiated in training); its gradient is still
    checked, as the layouts must be the same function."""
    cfg = DINOv3Config(hidden_size=32, num_layers=DEPTH, num_heads=2, intermediate_size=48, patch_size=8,
                       num_register_tokens=2, layerscale_value=0.5)
    per_layer = DINOv3(cfg, rngs=nnx.Rngs(0))
    stacked = _as_stacked(per_layer, lambda: DINOv3(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(0)))
    frames = jax.random.uniform(jax.random.key(1), (1, 2, 16, 24, 3), maxval=255.0)

    def loss(model):
        return jnp.sum(model(frames, rope_rng=jax.random.key(2)) ** 2)

    loss_p, grads_p = _value_and_grads(per_layer, loss)
    loss_s, grads_s = _value_and_grads(stacked, loss)
    np.testing.assert_allclose(loss_s, loss_p, **TIGHT)
    # atol: the patch embedding's bias gradient sums every patch's (terms ~1, sums ~1e-3): float32 rounding
    # of the two programs differs there by up to ~6e-6.
    _assert_same(grads_p, grads_s, "DINOv3 gradients", rtol=1e-4, atol=2e-5)


# ---- official weights into both layouts, and back -----------------------------------------------------------


def _forward_deltatok(model):
    x, y = jax.random.normal(jax.random.key(3), (2, 2, 16, 32))
    rope = model.rope((4, 4), None)
    z = model.encode(x, y, rope)
    return np.asarray(z), np.asarray(model.decode(z, x, rope))


def test_official_deltatok_weights_load_into_both_layouts_and_export_back(tmp_path):
    from safetensors.numpy import save_file

    random_model = DeltaTok(_deltatok_config(layer_scale_init=0.5), rngs=nnx.Rngs(7))
    official = common.unmap_weights(common.model_params(random_model), DELTATOK_TABLE)
    assert "encoder_blocks.2.mlp.up_proj.weight" in official  # official names and [out, in] layouts
    path = str(tmp_path / "deltatok.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in official.items()}, path)
    per_layer = load_deltatok(path)
    stacked = load_deltatok(path, scan_layers=True)
    assert isinstance(stacked.encoder_blocks, block_stack.BlockStack) and isinstance(per_layer.encoder_blocks, nnx.List)
    for a, b in zip(_forward_deltatok(per_layer), _forward_deltatok(stacked)):
        np.testing.assert_allclose(a, b, **SAME_FORWARD)
    exported = common.unmap_weights(common.model_params(stacked), DELTATOK_TABLE)
    assert exported.keys() == official.keys()
    for key in official:
        np.testing.assert_array_equal(exported[key], official[key], err_msg=key)


def test_stacked_fill_is_strict_per_layer():
    random_model = DeltaTok(_deltatok_config(), rngs=nnx.Rngs(7))
    official = common.unmap_weights(common.model_params(random_model), DELTATOK_TABLE)
    broken = dict(official)
    del broken["decoder_blocks.1.mlp.down_proj.bias"]
    broken["encoder_blocks.0.norm1.weight"] = np.ones(33, np.float32)
    broken["encoder_blocks.3.norm1.weight"] = np.ones(32, np.float32)  # a layer beyond the depth
    abstract = nnx.eval_shape(lambda: DeltaTok(_deltatok_config(scan_layers=True), rngs=nnx.Rngs(0)))
    with pytest.raises(common.CheckpointMismatchError) as error:
        common.fill_abstract_model(abstract, common.map_weights(broken, DELTATOK_TABLE))
    message = str(error.value)
    for expected in ("1 unused checkpoint entries", "encoder_blocks.3.norm1.weight",
                     "1 missing model parameters", "decoder_blocks.1.mlp.down_proj.bias (layer 1 of "
                     "decoder_blocks.stacked.mlp.down_proj.bias)",
                     "1 shape mismatches", "encoder_blocks.0.norm1.weight (layer 0 of encoder_blocks.stacked.norm1.weight): "
                     "checkpoint (33,) vs model (32,)"):
        assert expected in message, message


def test_transformers_dinov3_folder_loads_into_both_layouts(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from deltaworld_jax.pretrained.dinov3 import load_dinov3

    torch.manual_seed(0)
    hf = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=DEPTH,
                                        num_attention_heads=2, patch_size=8, num_register_tokens=2)).eval()
    hf.save_pretrained(tmp_path)
    per_layer, stacked = load_dinov3(str(tmp_path)), load_dinov3(str(tmp_path), scan_layers=True)
    assert isinstance(stacked.layer, block_stack.BlockStack) and len(stacked.layer) == DEPTH
    _assert_same(common.model_params(per_layer), common.model_params(stacked), "DINOv3 weights", rtol=0, atol=0)
    frames = np.random.default_rng(0).integers(0, 256, (1, 2, 16, 24, 3), dtype=np.uint8)
    np.testing.assert_allclose(np.asarray(per_layer(frames)), np.asarray(stacked(frames)), **SAME_FORWARD)


def _world_config(**kw) -> DeltaWorldConfig:
    return DeltaWorldConfig(hidden_size=32, num_layers=DEPTH, num_heads=2, backbone_hidden_size=24,
                            rope_axis_sizes=(12,), rope_unrotated_size=4, layer_scale_init=0.5, **kw)


def test_official_deltaworld_weights_load_into_both_layouts_and_export_back():
    official = world_state_dict(DeltaWorld(_world_config(), rngs=nnx.Rngs(3)))
    kw = dict(num_heads=2, rope_axis_sizes=(12,), rope_unrotated_size=4)
    per_layer, stacked = load_deltaworld(official, **kw), load_deltaworld(official, scan_layers=True, **kw)
    assert isinstance(stacked.predictor.blocks, block_stack.BlockStack)
    k1, k2 = jax.random.split(jax.random.key(4))
    queries, kv = jax.random.normal(k1, (2, 4, 32)), jax.random.normal(k2, (2, 6, 24))
    pos_q, pos_k = (jnp.tile(jnp.arange(4.0), (2, 1)),), (jnp.tile(jnp.arange(6.0), (2, 1)),)
    np.testing.assert_allclose(np.asarray(per_layer.predictor(queries, kv, pos_q, pos_k)),
                               np.asarray(stacked.predictor(queries, kv, pos_q, pos_k)), **SAME_FORWARD)
    exported = world_state_dict(stacked)
    assert exported.keys() == official.keys()
    for key in official:
        np.testing.assert_array_equal(exported[key], official[key], err_msg=key)


# ---- our Orbax runs of stacked models ------------------------------------------------------------------------


def test_forecast_and_frozen_tokenizer_read_our_stacked_runs(tmp_path):
    import orbax.checkpoint as ocp

    from deltaworld_jax import forecast
    from deltaworld_jax.pretrained import runs

    tok = DeltaTok(DeltaTokConfig(hidden_size=48, num_layers=2, num_heads=3, intermediate_size=32, scan_layers=True),
                   rngs=nnx.Rngs(0))
    world = DeltaWorld(DeltaWorldConfig(hidden_size=32, num_layers=2, num_heads=2, backbone_hidden_size=48,
                                        rope_axis_sizes=(12,), rope_unrotated_size=4, scan_layers=True),
                       rngs=nnx.Rngs(1))
    for name, model in (("tok_run", tok), ("world_run", world)):  # as the trainer saves them
        manager = ocp.CheckpointManager(tmp_path / name / "checkpoints",
                                        item_handlers={"params": ocp.StandardCheckpointHandler()})
        manager.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model, nnx.Param)))))
        manager.wait_until_finished()
        manager.close()
    loaded = forecast.load_models("pixel", str(tmp_path / "tok_run"), str(tmp_path / "world_run"), patch_size=4,
                                  world_num_heads=2, world_rope_axis_sizes=(12,))
    for name, model in (("tokenizer", tok), ("world", world)):  # the forecast builds per-layer models
        _assert_same(common.model_params(loaded[name]), common.model_params(model), name, rtol=0, atol=0)
    # DeltaWorld's frozen tokenizer from our own stacked DeltaTok run (tasks/deltaworld.build_tokenizer)
    fresh = DeltaTok(tok.cfg, rngs=nnx.Rngs(5))
    restored = runs.restore_module_params(str(tmp_path / "tok_run" / "checkpoints"), fresh)
    expected, got = common.model_params(tok), common.model_params(restored)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


# ---- shardings on a 4-device mesh ------------------------------------------------------------------------------

MESH_CHECK = textwrap.dedent(r"""
    import json, sys
    import jax
    from jax.sharding import PartitionSpec as P
    from flax import nnx
    from configs import tiny
    from deltaworld_jax import sharding
    from deltaworld_jax.training import trainer, train_step as step_lib

    def flat_specs(tree):
        return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(s.spec)
                for path, s in jax.tree_util.tree_leaves_with_path(tree)}

    out = {}
    for stacked in (False, True):
        config = tiny.get_config("deltatok")
        config.model.update(num_layers=2, num_heads=4, scan_layers=stacked)
        config.vfm = dict(kind="dinov3", preset="vits16", weights="", dtype="float32", scan_layers=stacked,
                          overrides=dict(hidden_size=48, num_heads=4, num_layers=2, intermediate_size=64, patch_size=4))
        config.mesh.shape = dict(data=1, fsdp=2, tensor=2)
        mesh = sharding.make_mesh(config.mesh)
        s = trainer.build(config, mesh)
        fresh = lambda: step_lib.init_train_state(*step_lib.split_trainable(s.task.build_trainable(nnx.Rngs(0)))[1:],
                                                  s.tx)
        with jax.set_mesh(mesh):
            state = jax.jit(fresh, out_shardings=s.state_shardings)()
        placed = {k: tuple(v.sharding.spec) for k, v in
                  {"/".join(str(getattr(k, "key", k)) for k in p): x
                   for p, x in jax.tree_util.tree_leaves_with_path(state.params)}.items()}
        out[str(stacked)] = dict(rules=flat_specs(s.state_shardings.params), placed=placed,
                                 frozen=flat_specs(s.frozen_shardings),
                                 frozen_placed={"/".join(str(getattr(k, "key", k)) for k in p): tuple(x.sharding.spec)
                                                for p, x in jax.tree_util.tree_leaves_with_path(s.frozen_state)})
    print("RESULT" + json.dumps(out))
""")


def test_stacked_parameters_shard_like_their_layers_on_a_4_device_mesh():
    proc = subprocess.run([sys.executable, "-c", MESH_CHECK], cwd=ROOT, env=check_env(devices=4), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    per_layer, stacked = out["False"], out["True"]
    for kind, (layer0, stack) in {"trainable": ("encoder_blocks/0/", "encoder_blocks/stacked/"),
                                  "frozen": ("layer/0/", "layer/stacked/")}.items():
        rules_p = per_layer["rules"] if kind == "trainable" else per_layer["frozen"]
        rules_s = stacked["rules"] if kind == "trainable" else stacked["frozen"]
        names = [k[len(layer0):] for k in rules_p if k.startswith(layer0)]
        assert names, (kind, sorted(rules_p)[:5])
        for name in names:
            # the stacked parameter's spec: the per-layer spec behind an unsharded layer axis
            assert rules_s[stack + name] == [None] + rules_p[layer0 + name], (kind, name)
    assert stacked["rules"]["encoder_blocks/stacked/mlp/up_proj/kernel"] == [None, "fsdp", "tensor"]
    assert stacked["rules"]["encoder_blocks/stacked/mlp/down_proj/kernel"] == [None, "tensor", "fsdp"]
    assert stacked["rules"]["encoder_blocks/stacked/norm1/weight"] == [None, None]
    assert stacked["frozen"]["layer/stacked/attention/q_proj/kernel"] == [None, "fsdp", "tensor"]
    # the placed arrays (a jitted init with the rules' out_shardings) carry those specs
    assert stacked["placed"]["encoder_blocks/stacked/mlp/up_proj/kernel"] == [None, "fsdp", "tensor"]
    assert stacked["frozen_placed"]["layer/stacked/mlp/up_proj/kernel"] == [None, "fsdp", "tensor"]
    assert stacked["placed"]["decoder_blocks/stacked/attention/o_proj/kernel"] == [None, "tensor", "fsdp"]
