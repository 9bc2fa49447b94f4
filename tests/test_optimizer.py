"""The official optimiser recipe: decay mask, warm-up schedule, AdamW + clipping against torch, and the frozen
module kept out of the optimiser."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from deltaworld_jax.training import optimizer as optimizer_lib
from deltaworld_jax.training import train_step as step_lib
from test_trainer import ToyPredictor, toy_config


def _optim(**kw):
    base = dict(lr=1e-2, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, grad_clip_norm=0.0)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_weight_decay_only_on_linear_weight_matrices():
    model = ToyPredictor(16, jnp.float32, nnx.Rngs(0))
    mask = optimizer_lib.weight_decay_mask(model)
    flat = {"/".join(map(str, k)): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]
            for k in [[getattr(p, "key", p) for p in k]]}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == sorted([
        "block/attention/q_proj/kernel", "block/attention/k_proj/kernel", "block/attention/v_proj/kernel",
        "block/attention/o_proj/kernel", "block/mlp/up_proj/kernel", "block/mlp/down_proj/kernel", "head/kernel"])
    # not decayed: the learned token, norms, LayerScale, biases
    for name in ("token", "block/norm1/weight", "block/layer_scale1/lambda1", "head/bias", "block/mlp/up_proj/bias"):
        assert flat[name] is False, name
    # the same mask from an abstract module (what the trainer uses)
    abstract = nnx.eval_shape(lambda: ToyPredictor(16, jnp.float32, nnx.Rngs(0)))
    assert jax.tree.leaves(optimizer_lib.weight_decay_mask(abstract)) == jax.tree.leaves(mask)


def test_decay_is_applied_exactly_to_the_mask():
    """Zero gradients: Adam's update is 0, so only decoupled decay moves parameters: p *= 1 - lr*wd."""
    model = ToyPredictor(16, jnp.float32, nnx.Rngs(0))
    _, params, _ = step_lib.split_trainable(model)
    mask = optimizer_lib.weight_decay_mask(model)
    tx = optimizer_lib.make_optimizer(_optim(), mask)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, state, params)
    new = optax.apply_updates(params, updates)
    for p, n, m in zip(jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(mask)):
        np.testing.assert_allclose(n, p * (1 - 1e-2 * 0.1) if m else p, rtol=1e-6)


def test_warmup_is_linear_from_zero_then_constant():
    schedule = optimizer_lib.learning_rate_schedule(1e-3, 5000)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(2500)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(5000)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(600_000)), 1e-3, rtol=1e-6)
    assert float(optimizer_lib.learning_rate_schedule(1e-4, 0)(0)) == pytest.approx(1e-4)


def test_matches_torch_adamw_with_param_groups_clipping_and_lambdalr():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = {"linear": {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                         "bias": rng.normal(size=(3,)).astype(np.float32)},
              "norm": {"weight": rng.normal(size=(3,)).astype(np.float32)}}
    mask = {"linear": {"kernel": True, "bias": False}, "norm": {"weight": False}}
    grads_seq = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 0.1, params) for _ in range(4)]
    cfg = _optim(lr=1e-2, warmup_steps=2, weight_decay=0.4, grad_clip_norm=0.05)

    tx = optimizer_lib.make_optimizer(cfg, mask)
    jp = jax.tree.map(jnp.asarray, params)
    state = tx.init(jp)
    for g in grads_seq:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, jp)
        jp = optax.apply_updates(jp, updates)

    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in
          {"k": params["linear"]["kernel"], "b": params["linear"]["bias"], "n": params["norm"]["weight"]}.items()}
    opt = torch.optim.AdamW([{"params": [tp["k"]], "weight_decay": 0.4},
                             {"params": [tp["b"], tp["n"]], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.999),
                            eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(step / 2, 1.0))
    for g in grads_seq:
        tp["k"].grad = torch.tensor(g["linear"]["kernel"])
        tp["b"].grad = torch.tensor(g["linear"]["bias"])
        tp["n"].grad = torch.tensor(g["norm"]["weight"])
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 0.05)
        opt.step()
        sched.step()
    np.testing.assert_allclose(jp["linear"]["kernel"], tp["k"].detach().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jp["linear"]["bias"], tp["b"].detach().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jp["norm"]["weight"], tp["n"].detach().numpy(), rtol=1e-5, atol=1e-7)


def test_frozen_module_is_not_in_the_optimizer_state():
    from deltaworld_jax.training import trainer

    config = toy_config()
    setup = trainer.build(config)
    params = setup.abstract_state.params
    assert "patch_embed" not in params  # the frozen encoder's only layer
    frozen_leaves = jax.tree.leaves(setup.frozen_state)
    assert len(frozen_leaves) == 2  # its kernel + bias live only in the frozen state
    n_params = len(jax.tree.leaves(params))
    opt_leaves = jax.tree.leaves(setup.abstract_state.opt_state)
    # Adam's mu and nu over the trainable params (masked-out leaves included) + scalar counters only
    assert sum(l.ndim > 0 for l in opt_leaves) == 2 * n_params
    frozen_shapes = {tuple(l.shape) for l in frozen_leaves}
    trainable_shapes = {tuple(l.shape) for l in jax.tree.leaves(params)}
    assert not (frozen_shapes - trainable_shapes) & {tuple(l.shape) for l in opt_leaves}


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_keep_if_takes_the_new_state_or_keeps_the_old_one(platform):
    """The step's skip of a non-finite update: a cond on CPU, a select per leaf elsewhere; the same result."""
    new = {"w": jnp.full((3, 2), 2.0), "mu": (jnp.ones(4), jnp.int32(7))}
    old = {"w": jnp.zeros((3, 2)), "mu": (jnp.zeros(4), jnp.int32(3))}
    for take, expected in ((True, new), (False, old)):
        got = jax.jit(lambda t: step_lib.keep_if(t, new, old, platform))(jnp.bool_(take))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
