"""DINO-World: the training forward against the official semantics (3-D RoPE (t, x=width, y=height), spatial
coordinates linspace(-1, 1) with endpoints, learned query per patch, frame-causal mask), the best-of-K
variant's official candidate layout, and the rollout's step loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from test_predictor import (assert_close, losses_over_steps, make_random, official_state_dict, to_torch,
                            torch_causal_mask, torch_predictor)

from deltaworld_jax.models.dinoworld import DINOWorld, DINOWorldConfig, spatial_positions, torch_linspace
from deltaworld_jax.models.predictor import candidate_queries

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, backbone_hidden_size=16, rope_axis_sizes=(4, 4, 4),
            rope_unrotated_size=4)
B, T, D = 2, 4, 16
GRID = (2, 3)  # height 2, width 3: distinguishes the x (width) and y (height) axes
P = GRID[0] * GRID[1]


def clip(seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(B, T, P, D)).astype(np.float32)
    times = np.cumsum(rng.uniform(1 / 25, 1 / 3, size=(B, T)), axis=1).astype(np.float32)
    return feats, times - times[:, :1]


def torch_coords():
    """The official _prepare_spatial_coords: meshgrid(linspace(-1, 1, h), linspace(-1, 1, w), 'ij')."""
    h, w = torch.meshgrid(torch.linspace(-1, 1, GRID[0]), torch.linspace(-1, 1, GRID[1]), indexing="ij")
    return w.flatten()[None].expand(B, -1), h.flatten()[None].expand(B, -1)


def torch_train_forward(model, queries_bqd, feats, times):
    """The official DINOWorld._forward_train predictor call, given the [B, (T-1)*P, hidden] queries."""
    y, ts = torch.from_numpy(feats), torch.from_numpy(times)
    w, h = torch_coords()
    pos_q = [ts[:, 1:].repeat_interleave(P, 1), w.repeat(1, T - 1), h.repeat(1, T - 1)]
    pos_k = [ts[:, :-1].repeat_interleave(P, 1), w.repeat(1, T - 1), h.repeat(1, T - 1)]
    mask = torch_causal_mask(np.arange((T - 1) * P) // P + 1, np.arange((T - 1) * P) // P)
    out = torch_predictor(official_state_dict(model), queries_bqd, y[:, :-1].reshape(B, (T - 1) * P, D), mask,
                          pos_q, pos_k, num_heads=2, axis_sizes=(4, 4, 4), unrotated=4)
    return out.reshape(B, T - 1, P, D)


def test_spatial_positions_have_endpoints_and_width_first():
    x, y = spatial_positions((2, 3))
    np.testing.assert_allclose(np.asarray(x), [-1, 0, 1, -1, 0, 1])
    np.testing.assert_allclose(np.asarray(y), [-1, -1, -1, 1, 1, 1])


def test_positions_are_torch_linspace_bit_for_bit():
    """jnp.linspace is 1-3 ulp off torch.linspace at interior points; the official positions are torch's."""
    for n in range(1, 70):
        np.testing.assert_array_equal(torch_linspace(-1.0, 1.0, n), torch.linspace(-1, 1, n).numpy(), err_msg=str(n))
    x, y = spatial_positions((7, 8))
    np.testing.assert_array_equal(np.asarray(y).reshape(7, 8)[:, 0], torch.linspace(-1, 1, 7).numpy())
    np.testing.assert_array_equal(np.asarray(x).reshape(7, 8)[0], torch.linspace(-1, 1, 8).numpy())


def test_training_forward_matches_official_to_float32_precision():
    """On a grid whose linspace interior points are not exact (7 x 8), the high-frequency RoPE (periods down to
    0.01) amplifies any position ulp: with jnp.linspace positions the error was 5e-6, with torch's ~1e-7."""
    grid, t = (7, 8), 2
    p = grid[0] * grid[1]
    model = make_random(lambda: DINOWorld(DINOWorldConfig(**{**TINY, "num_layers": 1}), rngs=nnx.Rngs(2)), seed=2)
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(1, t, p, D)).astype(np.float32)
    times = np.array([[0.0, 0.25]], np.float32)
    preds = nnx.jit(lambda m, f, ts: m.predict_next_frames(m.train_queries(f, ts, grid, None)[0], f, ts, grid))(
        model, jnp.asarray(feats), jnp.asarray(times))
    h, w = torch.meshgrid(torch.linspace(-1, 1, grid[0]), torch.linspace(-1, 1, grid[1]), indexing="ij")
    pos = [torch.from_numpy(times[:, :1]).repeat_interleave(p, 1), w.flatten()[None], h.flatten()[None]]
    q = to_torch(model.q_embed[...])[None].expand(1, p, -1)
    ref = torch_predictor(official_state_dict(model), q, torch.from_numpy(feats[:, 0]), None,
                          [torch.from_numpy(times[:, 1:]).repeat_interleave(p, 1)] + pos[1:], pos, num_heads=2,
                          axis_sizes=(4, 4, 4), unrotated=4)
    assert_close(preds[:, 0], ref.detach().numpy(), rel=1e-6)


def test_training_forward_matches_official():
    model = make_random(lambda: DINOWorld(DINOWorldConfig(**TINY), rngs=nnx.Rngs(0)))
    feats, times = clip()
    loss_and_preds = nnx.jit(lambda m, f, t: (m.loss(f, t, GRID), m.predict_next_frames(
        m.train_queries(f, t, GRID, None)[0], f, t, GRID)))
    (loss, _), preds = loss_and_preds(model, jnp.asarray(feats), jnp.asarray(times))
    q_embed = to_torch(model.q_embed[...])
    ref = torch_train_forward(model, q_embed.expand(B, (T - 1) * P, -1), feats, times)
    assert_close(preds, ref.detach().numpy())
    ref_loss = F.smooth_l1_loss(ref, torch.from_numpy(feats[:, 1:]), beta=0.1).item()
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)

    # Frame-causal: changing the last context frame leaves the predictions of the earlier frames unchanged.
    moved = feats.copy()
    moved[:, T - 2] = np.random.default_rng(9).normal(size=moved[:, T - 2].shape)
    _, preds2 = loss_and_preds(model, jnp.asarray(moved), jnp.asarray(times))
    np.testing.assert_array_equal(np.asarray(preds2[:, :T - 2]), np.asarray(preds[:, :T - 2]))
    assert not np.allclose(preds2[:, T - 2], preds[:, T - 2])


def test_best_of_k_variant_matches_official_candidate_layout():
    """use_bom: one noise query per (frame, candidate), repeated over the patches; the official flattening
    (frame, k, patch), positions expanded accordingly, mean loss over (patches, D) per candidate."""
    k = 4
    cfg = DINOWorldConfig(**TINY, use_bom=True, num_samples_train=k, bom_chunk=2, init_std=0.5)
    model = make_random(lambda: DINOWorld(cfg, rngs=nnx.Rngs(1)), seed=1)
    assert not hasattr(model, "q_embed")
    feats, times = clip(1)
    rng = jax.random.key(4)
    queries, _ = nnx.jit(lambda m: m.train_queries(jnp.asarray(feats), jnp.asarray(times), GRID, rng))(model)

    cands = np.asarray(candidate_queries(rng, jnp.arange(k), (B, T - 1), 32, 0.5))  # [B, T-1, K, hidden]
    ts = torch.from_numpy(times)
    w, h = torch_coords()
    q_all = to_torch(cands).flatten(1, 2).repeat_interleave(P, 1)
    pos_q = [ts[:, 1:].repeat_interleave(k, 1).repeat_interleave(P, 1)] + [
        c.unsqueeze(1).unsqueeze(2).expand(-1, T - 1, k, -1).flatten(1, 3) for c in (w, h)]
    pos_k = [ts[:, :-1].repeat_interleave(P, 1)] + [c.unsqueeze(1).expand(-1, T - 1, -1).flatten(1, 2)
                                                    for c in (w, h)]
    total = (T - 1) * P
    mask = torch_causal_mask(torch.arange(total).repeat_interleave(k).numpy() // P + 1, np.arange(total) // P)
    kv = torch.from_numpy(feats[:, :-1]).reshape(B, total, D)
    preds = torch_predictor(official_state_dict(model), q_all, kv, mask, pos_q, pos_k, num_heads=2,
                            axis_sizes=(4, 4, 4), unrotated=4).reshape(B, T - 1, k, P, D)
    tgts = torch.from_numpy(feats[:, 1:]).unsqueeze(2).expand_as(preds)
    best = F.smooth_l1_loss(preds, tgts, reduction="none", beta=0.1).flatten(3).mean(-1).argmin(-1).numpy()
    np.testing.assert_array_equal(np.asarray(queries), np.take_along_axis(cands, best[..., None, None], 2)[:, :, 0])


def test_loss_decreases_on_a_fixed_batch():
    model = make_random(lambda: DINOWorld(DINOWorldConfig(**{**TINY, "num_layers": 1}), rngs=nnx.Rngs(3)),
                        seed=3, scale=0.02)
    feats, times = clip(3)
    # Learnable structure: a shared offset plus small noise (pure noise has nothing to learn).
    feats = jnp.asarray(np.random.default_rng(3).normal(size=D) + 0.3 * feats, jnp.float32)
    times = jnp.asarray(times)
    losses = losses_over_steps(model, lambda m, rng: m.loss(feats, times, GRID)[0])
    assert losses[-1] < 0.7 * losses[0], losses


def test_rollout_follows_the_official_step_loop():
    model = make_random(lambda: DINOWorld(DINOWorldConfig(**TINY), rngs=nnx.Rngs(5)), seed=5, scale=0.1)
    feats, times = map(jnp.asarray, clip(5))
    ctx_len = 2
    preds, targets = nnx.jit(lambda m: m.rollout(feats, times, grid_hw=GRID, ctx_len=ctx_len))(model)
    assert preds.shape == (B, 1, T - ctx_len, P, D)
    np.testing.assert_array_equal(np.asarray(targets), np.asarray(feats[:, ctx_len:]))

    # Official rollout_step in torch: kv = context patches, then each prediction appended.
    sd = official_state_dict(model)
    w, h = torch_coords()
    ts = to_torch(times)
    kv = to_torch(feats[:, :ctx_len]).reshape(B, ctx_len * P, D)
    q = to_torch(model.q_embed[...]).expand(B, P, -1)
    for step in range(T - ctx_len):
        n_kv = kv.shape[1] // P
        tgt = ctx_len + step
        pos_q = [ts[:, tgt:tgt + 1].repeat_interleave(P, 1), w, h]
        pos_k = [ts[:, :n_kv].repeat_interleave(P, 1), w.repeat(1, n_kv), h.repeat(1, n_kv)]
        y_hat = torch_predictor(sd, q, kv, None, pos_q, pos_k, num_heads=2, axis_sizes=(4, 4, 4), unrotated=4)
        assert_close(preds[:, 0, step], y_hat.detach().numpy())
        kv = torch.cat([kv, y_hat], 1)


def test_bad_inputs_are_rejected():
    model = nnx.eval_shape(lambda: DINOWorld(DINOWorldConfig(**TINY), rngs=nnx.Rngs(0)))
    feats, times = clip()
    with pytest.raises(ValueError, match="patches per frame"):
        model.loss(jnp.asarray(feats), jnp.asarray(times), (3, 3))
    with pytest.raises(ValueError, match="3 axes"):
        DINOWorld(DINOWorldConfig(**{**TINY, "rope_axis_sizes": (12,)}), rngs=nnx.Rngs(0))
