"""Stacks of identical blocks (block_stack.run_blocks): per-layer blocks run unrolled (no scan, no per-call copy
of their parameters into a stack), blocks stored stacked run as one scan; remat is a model option of either:
every remat policy gives the same loss and gradients while changing the program (recompute FLOPs, saved
residuals); config.model.remat reaches the models. (Stacked against per-layer: tests/test_stacked_layers.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from deltaworld_jax import flops as flops_lib, tasks
from deltaworld_jax.models import block_stack, blocks
from deltaworld_jax.models import rope as rope_lib
from deltaworld_jax.models.deltatok import DeltaTok, DeltaTokConfig
from deltaworld_jax.models.predictor import Predictor, PredictorConfig


BLOCK = blocks.BlockConfig(blocks.AttentionConfig(64, 2, qk_norm=True, output_gate=True), 128, gated_mlp=True,
                           act="silu", layer_scale_init=0.5)


def _blocks(n: int) -> nnx.List:
    return nnx.List([blocks.Block(BLOCK, rngs=nnx.Rngs(i)) for i in range(n)])


def _stack(n: int) -> block_stack.BlockStack:
    return block_stack.BlockStack(n, lambda r: blocks.Block(BLOCK, rngs=r), rngs=nnx.Rngs(0))


def _unrolled(blocks, x, rope):
    for block in blocks:
        x = block(x, rope)
    return x


def test_per_layer_blocks_run_unrolled_forward_and_gradients():
    x = jax.random.normal(jax.random.key(1), (2, 17, 64))
    rope = rope_lib.rope_2d((4, 4), 32)  # 16 patches after one prefix token, broadcast to every layer
    blocks = _blocks(3)
    np.testing.assert_array_equal(block_stack.run_blocks(blocks, x, rope), _unrolled(blocks, x, rope))
    # No scan, and no stacked copy of the parameters: the program is three blocks' programs, no more.
    def count(n):
        jaxpr = jax.make_jaxpr(lambda b: block_stack.run_blocks(b, x, rope))(_blocks(n))
        names = [e.primitive.name for e in jaxpr.jaxpr.eqns]
        return len(names), sum(name in ("concatenate", "stack") for name in names), "scan" in names

    (one, one_concat, _), (three, three_concat, three_scans) = count(1), count(3)
    assert not three_scans
    assert three == 3 * one and three_concat == 3 * one_concat, (one, three, one_concat, three_concat)

    def loss(run):
        return lambda b: jnp.sum(run(b, x, rope) ** 2)

    run = nnx.grad(loss(lambda b, x, r: block_stack.run_blocks(b, x, r)))(blocks)
    unrolled = nnx.grad(loss(_unrolled))(blocks)
    for a, b in zip(jax.tree.leaves(run), jax.tree.leaves(unrolled)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # The gradient reaches every block's own parameters (they are not shared).
    pure = nnx.to_pure_dict(run)
    per_block = [np.asarray(pure[i]["attention"]["q_proj"]["kernel"]) for i in range(3)]
    assert not np.allclose(per_block[0], per_block[1])


def test_a_stored_stack_is_traced_once_not_per_layer():
    x = jnp.zeros((1, 17, 64))
    rope = rope_lib.rope_2d((4, 4), 32)
    jaxpr = jax.make_jaxpr(lambda b: block_stack.run_blocks(b, x, rope))(_stack(4))
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == 4
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert not dots  # every matmul lives in the scan body


def residual_size(fn, *args) -> int:
    """Number of values the backward pass of fn(*args) keeps from the forward pass (the leaves of its vjp)."""
    vjp_fn = jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *args)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(vjp_fn))


def _grads_flops_residuals(policy: str):
    blocks = _blocks(2)
    x = jax.random.normal(jax.random.key(1), (2, 17, 64))

    def loss(b, x):
        return jnp.sum(block_stack.run_blocks(b, x, remat=policy) ** 2)

    grad = lambda b, x: nnx.grad(loss)(b, x)  # noqa: E731
    graphdef, state = nnx.split(blocks)
    residuals = residual_size(lambda s: loss(nnx.merge(graphdef, s), x), state)
    return jax.jit(grad)(blocks, x), flops_lib.jaxpr_matmul_flops(grad, blocks, x)[0], residuals


def test_remat_policies_keep_gradients_and_change_the_program():
    base_grads, base_flops, base_res = _grads_flops_residuals("none")
    full_grads, full_flops, full_res = _grads_flops_residuals("full")
    for a, b in zip(jax.tree.leaves(base_grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # "full": the forward runs again in the backward pass (fwd + bwd = 3 fwd -> 4 fwd), except each block's last
    # matmul (the MLP's down_proj): with its LayerScale folded into the weights (basic_layers.scaled_linear), no
    # gradient needs that matmul's output, so the recomputation leaves it out.
    down_proj_flops = 2 * (2 * 17) * BLOCK.intermediate_size * 64  # per block: 2 x tokens x in x out
    assert full_flops == pytest.approx(base_flops * 4 / 3 - 2 * down_proj_flops, rel=1e-6)
    # ... and keeps far less for the backward pass than no remat does.
    assert full_res < base_res / 2, (full_res, base_res)
    # "dots_saveable": matmul outputs are kept, so no matmul is recomputed; it keeps less than "none".
    _, dots_flops, dots_res = _grads_flops_residuals("dots_saveable")
    assert dots_flops == pytest.approx(base_flops, rel=1e-6)
    assert full_res < dots_res < base_res, (full_res, dots_res, base_res)


def test_unknown_remat_policy_is_refused_by_the_model_configs():
    with pytest.raises(ValueError, match="remat"):
        DeltaTokConfig(hidden_size=32, num_heads=2, remat="sometimes")
    with pytest.raises(ValueError, match="remat"):
        PredictorConfig(hidden_size=32, num_heads=2, rope_axis_sizes=(12,), remat="sometimes")
    with pytest.raises(ValueError, match="remat"):
        block_stack.run_blocks(_blocks(2), jnp.zeros((1, 17, 64)), remat="sometimes")


def _deltatok_loss_grads_residuals(remat: str):
    model = DeltaTok(DeltaTokConfig(hidden_size=32, num_heads=2, num_layers=2, intermediate_size=64, remat=remat),
                     rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    rope = model.rope((4, 4))
    graphdef, state = nnx.split(model)

    def loss(s):
        m = nnx.merge(graphdef, s)
        return jnp.mean((m.decode(m.encode(x, x + 1, rope), x, rope) - x - 1) ** 2)

    return jax.jit(jax.value_and_grad(loss))(state), residual_size(loss, state)


def test_deltatok_remat_option_same_loss_and_grads_other_program():
    (loss, grads), kept = _deltatok_loss_grads_residuals("none")
    (loss_r, grads_r), kept_r = _deltatok_loss_grads_residuals("full")
    np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    assert kept_r < kept / 2, (kept_r, kept)  # the backward pass recomputes instead of keeping activations


def test_predictor_remat_option_same_output_and_grads():
    def run(remat):
        cfg = PredictorConfig(hidden_size=32, num_layers=3, num_heads=2, backbone_hidden_size=24,
                              rope_axis_sizes=(12,), remat=remat)
        model = Predictor(cfg, rngs=nnx.Rngs(0))
        q = jax.random.normal(jax.random.key(1), (2, 3, 32))
        kv = jax.random.normal(jax.random.key(2), (2, 5, 24))
        pos_q, pos_k = (jnp.broadcast_to(jnp.arange(3.0), (2, 3)),), (jnp.broadcast_to(jnp.arange(5.0), (2, 5)),)
        mask = (jnp.arange(5)[None, :] < jnp.arange(1, 4)[:, None])[None, None]
        return jax.jit(nnx.value_and_grad(lambda m: jnp.sum(m(q, kv, pos_q, pos_k, mask) ** 2)))(model)

    (out, grads), (out_r, grads_r) = run("none"), run("dots_with_no_batch_dims_saveable")
    np.testing.assert_allclose(float(out_r), float(out), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["deltatok", "deltaworld", "dinoworld"])
def test_config_model_remat_reaches_the_trained_model(kind):
    """config.model.remat is a field of the model configs: the task builds the trainable model with it."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
    spec = importlib.util.spec_from_file_location("tiny_config", path)
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    config = tiny.get_config(kind)
    config.model.remat = "full"
    model = nnx.eval_shape(lambda: tasks.make_task(config).build_trainable(nnx.Rngs(0)))
    cfg = model.cfg if kind == "deltatok" else model.predictor.cfg
    assert cfg.remat == "full"
    config.model.remat = "sometimes"
    with pytest.raises(ValueError, match="remat"):
        tasks.make_task(config).build_trainable(nnx.Rngs(0))
    assert isinstance(config, ml_collections.ConfigDict)


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_blocks_of_an_outer_trace_run_remat_inside_a_scan(num_blocks):
    """As DeltaTok's rollout and the best-of-K search do: modules made outside a lax.scan, called inside it
    (nnx.remat must not write back into them)."""
    blocks = _blocks(num_blocks)
    x = jax.random.normal(jax.random.key(1), (2, 17, 64))

    def step(carry, _):
        return block_stack.run_blocks(blocks, carry, remat="full"), None

    out = jax.jit(lambda x: jax.lax.scan(step, x, None, length=2)[0])(x)
    expected = _unrolled(blocks, _unrolled(blocks, x, None), None)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_auto_remat_recomputes_attention_only_when_scanning():
    """"auto" (the model configs' default): a scanned stack (stored stacked) keeps the weight matmuls only;
    per-layer blocks (unrolled, where XLA can still rematerialise on its own) and a one-layer stack keep
    everything."""
    x = jax.random.normal(jax.random.key(1), (2, 17, 64))

    def kept(blocks, policy):
        graphdef, state = nnx.split(blocks)
        return residual_size(lambda s: jnp.sum(block_stack.run_blocks(nnx.merge(graphdef, s), x, remat=policy) ** 2),
                             state)

    assert kept(_stack(2), "auto") == kept(_stack(2), block_stack.SCANNED_REMAT) < kept(_stack(2), "none")
    assert kept(_blocks(2), "auto") == kept(_blocks(2), "none") > kept(_blocks(2), block_stack.SCANNED_REMAT)
    assert kept(_stack(1), "auto") == kept(_stack(1), "none")
    assert DeltaTokConfig().remat == PredictorConfig().remat == "auto"
