"""DeltaWorld: the training forward against the official semantics (fixed noise), best-of-K against the
official flattened candidate layout, gradients only through the chosen queries' pass, a few training steps,
the rollout (S futures sharing the context, each decoded from its own previous prediction)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from test_predictor import (assert_close, losses_over_steps, make_random, official_state_dict, to_torch,
                            torch_causal_mask, torch_predictor)

from deltaworld_jax.models.deltatok import DeltaTok, DeltaTokConfig
from deltaworld_jax.models.deltaworld import DeltaWorld, DeltaWorldConfig
from deltaworld_jax.models.predictor import candidate_queries, noise_queries
from deltaworld_jax.objectives import smooth_l1

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, backbone_hidden_size=16, rope_axis_sizes=(12,),
            rope_unrotated_size=4)
B, T, D = 2, 5, 16


def clip(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(B, T, D)).astype(np.float32)
    times = np.cumsum(rng.uniform(1 / 25, 1 / 3, size=(B, T)), axis=1).astype(np.float32)
    return tokens, times - times[:, :1]


def torch_forward(model, queries, tokens, times):
    """The official DeltaWorld._forward_train loss pass, given the queries."""
    t = tokens.shape[1]
    return torch_predictor(official_state_dict(model), to_torch(queries),
                           torch.from_numpy(tokens[:, :-1]), torch_causal_mask(np.arange(1, t), np.arange(t - 1)),
                           [torch.from_numpy(times[:, 1:])], [torch.from_numpy(times[:, :-1])],
                           num_heads=2, axis_sizes=(12,), unrotated=4)


def test_training_forward_matches_official_with_fixed_noise():
    model = make_random(lambda: DeltaWorld(DeltaWorldConfig(**TINY), rngs=nnx.Rngs(0)))
    tokens, times = clip()
    queries = noise_queries(jax.random.key(3), (B, T - 1), 32, 0.5)
    ours = nnx.jit(lambda m: m.predict_next_tokens(queries, jnp.asarray(tokens), jnp.asarray(times)))(model)
    ref = torch_forward(model, queries, tokens, times)
    assert_close(ours, ref.detach().numpy())
    ref_loss = F.smooth_l1_loss(ref, torch.from_numpy(tokens[:, 1:]), beta=0.1).item()
    np.testing.assert_allclose(float(jnp.mean(smooth_l1(ours, tokens[:, 1:], 0.1))), ref_loss, rtol=1e-5)


def test_best_of_k_matches_official_candidate_layout():
    """The official _bom_queries: all K candidates of all frames in ONE pass, queries flattened (frame, k),
    positions repeat_interleave'd, mask q_index = position // 1 + 1; argmin of the per-candidate mean loss."""
    k = 8
    cfg = DeltaWorldConfig(**TINY, num_samples_train=k, bom_chunk=4, init_std=0.5)
    model = make_random(lambda: DeltaWorld(cfg, rngs=nnx.Rngs(1)), seed=1)
    tokens, times = clip(1)
    rng = jax.random.key(5)
    queries, metrics = nnx.jit(lambda m: m.train_queries(jnp.asarray(tokens), jnp.asarray(times), rng))(model)

    cands = np.asarray(candidate_queries(rng, jnp.arange(k), (B, T - 1), 32, 0.5))  # [B, T-1, K, hidden]
    q_all = to_torch(cands).flatten(1, 2)
    pos_q = torch.from_numpy(times[:, 1:]).repeat_interleave(k, 1)
    q_index = torch.arange(T - 1).repeat_interleave(k) + 1
    preds = torch_predictor(official_state_dict(model), q_all, torch.from_numpy(tokens[:, :-1]),
                            torch_causal_mask(q_index.numpy(), np.arange(T - 1)), [pos_q],
                            [torch.from_numpy(times[:, :-1])], num_heads=2, axis_sizes=(12,), unrotated=4)
    preds = preds.reshape(B, T - 1, k, 1, D)
    tgts = torch.from_numpy(tokens[:, 1:]).reshape(B, T - 1, 1, D).unsqueeze(2).expand_as(preds)
    losses = F.smooth_l1_loss(preds, tgts, reduction="none", beta=0.1).flatten(3).mean(-1)
    best = losses.argmin(-1).numpy()
    assert len(np.unique(best)) > 1, "the tiny case should not pick the same candidate everywhere"
    expected = np.take_along_axis(cands, best[..., None, None], 2)[:, :, 0]
    np.testing.assert_array_equal(np.asarray(queries), expected)
    np.testing.assert_allclose(float(metrics["bom_best_loss"]), losses.min(-1).values.mean().item(), rtol=1e-5)


def test_gradient_flows_only_through_the_chosen_queries_pass():
    cfg = DeltaWorldConfig(**{**TINY, "num_layers": 1}, num_samples_train=8, bom_chunk=4)
    model = make_random(lambda: DeltaWorld(cfg, rngs=nnx.Rngs(2)), seed=2, scale=0.1)
    tokens, times = jnp.asarray(clip(2)[0]), jnp.asarray(clip(2)[1])
    rng = jax.random.key(1)

    @nnx.jit
    def both(m):
        grads_bom = nnx.grad(lambda m: m.loss(tokens, times, rng)[0])(m)
        chosen, _ = m.train_queries(tokens, times, rng)
        direct = lambda m: jnp.mean(smooth_l1(m.predict_next_tokens(chosen, tokens, times), tokens[:, 1:], 0.1))  # noqa: E731
        return grads_bom, nnx.grad(direct)(m)

    grads_bom, grads_direct = both(model)
    flat_bom, flat_direct = jax.tree.leaves(grads_bom), jax.tree.leaves(grads_direct)
    assert len(flat_bom) == len(flat_direct) > 0
    for a, b in zip(flat_bom, flat_direct):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)
    assert any(float(jnp.abs(g).max()) > 0 for g in flat_bom)


def test_loss_decreases_on_a_fixed_batch():
    cfg = DeltaWorldConfig(**{**TINY, "num_layers": 1}, num_samples_train=4, bom_chunk=None)
    model = make_random(lambda: DeltaWorld(cfg, rngs=nnx.Rngs(3)), seed=3, scale=0.02)
    tokens, times = clip(3)
    # Learnable structure: a shared offset plus small noise (pure noise has nothing to learn).
    tokens = jnp.asarray(np.random.default_rng(3).normal(size=D) + 0.3 * tokens, jnp.float32)
    times = jnp.asarray(times)
    losses = losses_over_steps(model, lambda m, rng: m.loss(tokens, times, rng)[0])
    assert losses[-1] < 0.7 * losses[0], losses


# ------------------------------------------------------------------------------------------------------
# Rollout
# ------------------------------------------------------------------------------------------------------

GRID = (2, 3)
ROLLOUT_CTX = 2


@pytest.fixture(scope="module")
def rollout_setup():
    tok_cfg = DeltaTokConfig(hidden_size=D, num_layers=1, num_heads=2, intermediate_size=32)
    world_cfg = DeltaWorldConfig(**{**TINY, "num_layers": 1}, num_samples_eval=3)

    # Random weights of a size where the context visibly moves the futures.
    tok = make_random(lambda: DeltaTok(tok_cfg, rngs=nnx.Rngs(0)), seed=0, scale=0.1)
    world = make_random(lambda: DeltaWorld(world_cfg, rngs=nnx.Rngs(1)), seed=1, scale=0.1)
    rng = np.random.default_rng(4)
    feats = jnp.asarray(rng.normal(size=(B, T, GRID[0] * GRID[1], D)), jnp.float32)
    times = jnp.asarray(np.tile(np.arange(T, dtype=np.float32) * 0.2, (B, 1)))
    black = jnp.asarray(rng.normal(size=(1, GRID[0] * GRID[1], D)), jnp.float32)
    # ONE compiled rollout (ctx_len 2, S = 3) serves both rollout tests.
    run = nnx.jit(lambda w, t, f, r: w.rollout(t, f, times, grid_hw=GRID, ctx_len=ROLLOUT_CTX, rng=r,
                                               black_bnd=black))
    return tok, world, feats, times, black, run


def test_rollout_samples_share_the_context_and_differ(rollout_setup):
    tok, world, feats, times, black, run = rollout_setup
    ctx_len, s = ROLLOUT_CTX, 3
    preds, targets = run(world, tok, feats, jax.random.key(0))
    assert preds.shape == (B, s, T - ctx_len, GRID[0] * GRID[1], D)
    np.testing.assert_array_equal(np.asarray(targets), np.asarray(feats[:, ctx_len:]))
    # Different samples, different futures (every pair, every step).
    for i in range(s):
        for j in range(i + 1, s):
            assert not np.allclose(preds[:, i], preds[:, j], atol=1e-4)
    # The context is shared: changing only the frames after the context (targets) changes nothing.
    other, _ = run(world, tok, feats.at[:, ctx_len:].set(0.0), jax.random.key(0))
    np.testing.assert_allclose(np.asarray(other), np.asarray(preds), rtol=1e-6, atol=1e-6)
    # ...while changing a context frame changes the futures.
    moved, _ = run(world, tok, feats.at[:, 0].set(feats[:, 1]), jax.random.key(0))
    assert not np.allclose(moved, preds, atol=1e-4)


def test_rollout_follows_the_official_step_loop(rollout_setup):
    """A Python transcription of the official rollout_step loop (same noise): tokens of the context, then per
    step: predict, decode from the sample's own previous features (the last context frame's at first),
    append the token."""
    tok, world, feats, times, black, run = rollout_setup
    ctx_len, s = ROLLOUT_CTX, 3
    horizon = T - ctx_len
    rng = jax.random.key(9)
    preds, _ = run(world, tok, feats, rng)

    @nnx.jit
    def reference(world, tok):
        rope = tok.rope(GRID)
        kv = jnp.repeat(tok.tokenize_clip(feats[:, :ctx_len], black, rope), s, axis=0)
        x = jnp.repeat(feats[:, ctx_len - 1], s, axis=0)
        ts = jnp.repeat(times, s, axis=0)
        out = []
        for step, key in enumerate(jax.random.split(rng, horizon)):
            q = noise_queries(key, (B * s, 1), 32, world.cfg.init_std)
            z = world.predictor(q, kv, (ts[:, ctx_len + step:ctx_len + step + 1],), (ts[:, :kv.shape[1]],))
            x = tok.decode(z, x, rope)
            out.append(x)
            kv = jnp.concatenate([kv, z], axis=1)
        return jnp.stack(out, 1).reshape(B, s, horizon, -1, D)

    np.testing.assert_allclose(np.asarray(preds), np.asarray(reference(world, tok)), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# The training task and the memory of the best-of-K search
# ------------------------------------------------------------------------------------------------------


def task_config(**tokenizer):
    import ml_collections

    model = {k: v for k, v in TINY.items() if k != "backbone_hidden_size"}  # taken from the VFM (48)
    model["num_layers"] = 1
    return ml_collections.ConfigDict(dict(
        model=dict(kind="deltaworld", **model, num_samples_train=4, bom_chunk=2),
        vfm=dict(kind="pixel", patch_size=4, num_heads=4),
        tokenizer=dict(checkpoint="", num_layers=1, intermediate_size=32, **tokenizer)))


def test_task_trains_from_frames_or_from_precomputed_tokens():
    from deltaworld_jax.tasks import make_task
    from deltaworld_jax.tasks.deltaworld import clip_tokens

    task = make_task(task_config(allow_random=True))
    world = task.build_trainable(nnx.Rngs(0))
    frozen = task.build_frozen()
    assert world.cfg.backbone_hidden_size == 48 and frozen["tokenizer"].cfg.hidden_size == 48
    frames = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(2, 3, 8, 8, 3)), jnp.uint8)
    times = jnp.asarray([[0.0, 0.1, 0.3], [0.0, 0.2, 0.25]], jnp.float32)
    rng = jax.random.key(0)

    @nnx.jit
    def losses(world, frozen):
        from_frames = task.loss(world, frozen, {"frames": frames, "timestamps": times}, rng)[0]
        tokens = clip_tokens(frozen["vfm"], frozen["tokenizer"], frames)
        from_tokens = task.loss(world, None, {"tokens": tokens, "timestamps": times}, rng)[0]
        return from_frames, from_tokens, tokens

    from_frames, from_tokens, tokens = losses(world, frozen)
    assert tokens.shape == (2, 3, 48) and np.isfinite(float(from_frames))
    np.testing.assert_allclose(float(from_frames), float(from_tokens), rtol=1e-6)


def test_tokenizer_attention_option_reaches_the_frozen_tokenizer():
    """config.tokenizer.attention_impl picks the frozen tokenizer's attention kernel: on TPU v5e DeltaWorld 512px
    compiles at 4-16 per chip only with it on splash (libtpu 0.0.42.1 crashes on the `xla` attention;
    benchmarks/RESULTS.md, session 10). Built abstractly, as the ahead-of-time compiles build it."""
    from deltaworld_jax.tasks import make_task

    default = nnx.eval_shape(make_task(task_config(allow_random=True)).build_frozen)["tokenizer"]
    splash = nnx.eval_shape(make_task(task_config(allow_random=True, attention_impl="splash")).build_frozen)["tokenizer"]
    assert default.cfg.attention_impl == "xla" and splash.cfg.attention_impl == "splash"


def test_task_without_tokenizer_weights_says_so():
    from deltaworld_jax.tasks import make_task

    with pytest.raises(ValueError, match="checkpoint is empty"):
        make_task(task_config()).build_frozen()


def test_best_of_k_memory_does_not_grow_with_k():
    """The compiled train step's temp memory with K = 32 candidates in chunks of 4 stays at the K = 4 level:
    the search keeps no activations for backprop and holds one chunk at a time (were the eight chunks'
    activations kept, temp would grow several times)."""
    tokens, times = map(jnp.asarray, clip(6))

    def temp_bytes(k, chunk):
        cfg = DeltaWorldConfig(**{**TINY, "num_layers": 1}, num_samples_train=k, bom_chunk=chunk)
        model = nnx.eval_shape(lambda: DeltaWorld(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        grad = jax.jit(lambda s: jax.grad(lambda s: nnx.merge(graphdef, s).loss(tokens, times, jax.random.key(0))[0])(s))
        return grad.lower(state).compile().memory_analysis().temp_size_in_bytes

    base, chunked = temp_bytes(4, 4), temp_bytes(32, 4)
    assert chunked <= 1.25 * base, (base, chunked)
