"""Checks that need a GPU, skipped elsewhere: cuDNN flash attention (models/attention.py, "cudnn", which "auto"
picks on a GPU for bf16) against the reference path, forward and gradients, with and without the predictor's
frame-causal mask, alone and inside the predictor. `benchmarks/gpu_session.sh` runs them on a lent GPU machine
(JAX_PLATFORMS=cuda; the suite's own JAX_PLATFORMS=cpu skips them).

Margins: the inputs are bfloat16 (cuDNN's flash attention takes bf16 / fp16 only), the reference computes from
the SAME bf16 inputs in float32, so the differences are cuDNN's bf16 output and intermediate roundings: outputs
within 2^-6 (two bf16 ulps at 1) absolute + 2^-6 relative, gradients within 3% of their largest entry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deltaworld_jax.models import attention
from deltaworld_jax.models.predictor import Predictor, PredictorConfig

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="needs a GPU: run with JAX_PLATFORMS=cuda (benchmarks/gpu_session.sh)")

OUT_TOL = 2.0 ** -6
GRAD_TOL = 0.03


def _qkv(b: int, lq: int, lk: int, h: int, hd: int, seed: int):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(b, n, h, hd)), jnp.bfloat16) for n in (lq, lk, lk))


def _out_and_grads(implementation: str, q, k, v, mask):
    weights = jnp.asarray(np.random.default_rng(9).normal(size=q.shape[:3] + (v.shape[-1],)), jnp.float32)

    def loss(q, k, v):
        out = attention.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    if implementation == "reference":  # the ground truth in float32 from the same bf16 values
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return np.asarray(out, np.float32), [np.asarray(g, np.float32) for g in grads]


def _masks(kind: str, lq: int, lk: int, frames: int):
    if kind == "none":
        return None
    # The world models' predictor: a query of frame f (1..frames) sees the keys of frames 0..f-1, so no query
    # is left without keys.
    per_q, per_k = lq // frames, lk // frames
    return attention.frame_causal_mask(np.repeat(np.arange(1, frames + 1), per_q), np.repeat(np.arange(frames), per_k))


@pytest.mark.parametrize("mask_kind", ["none", "frame_causal"])
@pytest.mark.parametrize("length,heads,head_dim", [(261, 12, 64), (69, 3, 64), (128, 2, 16)])
def test_cudnn_matches_reference(mask_kind, length, heads, head_dim):
    """The ViTs' awkward lengths (256 patches + 5 prefix tokens), the benchmarks' small ones, a head of 16."""
    frames = 3 if length % 3 == 0 else 1
    if mask_kind == "frame_causal" and frames == 1:
        frames, length = 3, length - length % 3
    q, k, v = _qkv(2, length, length, heads, head_dim, seed=length)
    mask = _masks(mask_kind, length, length, frames)
    assert attention.resolve_implementation("auto", q, mask) == "cudnn"
    out, grads = _out_and_grads("cudnn", q, k, v, mask)
    ref_out, ref_grads = _out_and_grads("reference", q, k, v, mask)
    np.testing.assert_allclose(out, ref_out, atol=OUT_TOL, rtol=OUT_TOL)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert np.abs(g - r).max() <= GRAD_TOL * np.abs(r).max(), (name, np.abs(g - r).max(), np.abs(r).max())


def test_predictor_with_auto_attention_matches_reference_on_gpu():
    """The predictor in bf16 with "auto" (cuDNN here) against the same weights with the reference path."""
    kw = dict(hidden_size=128, num_layers=2, num_heads=2, backbone_hidden_size=24, rope_axis_sizes=(60,),
              rope_unrotated_size=4, scan_layers=True)
    models = {impl: Predictor(PredictorConfig(**kw, attention_impl=impl), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
              for impl in ("auto", "reference")}
    rng = np.random.default_rng(5)
    b, f, p = 2, 3, 10
    queries = jnp.asarray(rng.normal(size=(b, f * p, 128)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(b, f * p, 24)), jnp.float32)
    pos_q = (jnp.asarray(rng.uniform(size=(b, f * p)), jnp.float32),)
    pos_k = (jnp.asarray(rng.uniform(size=(b, f * p)), jnp.float32),)
    mask = attention.frame_causal_mask(np.repeat(np.arange(1, f + 1), p), np.repeat(np.arange(f), p))
    outs = {impl: np.asarray(jax.jit(lambda q, kv, m=m: m(q, kv, pos_q, pos_k, mask))(queries, kv), np.float32)
            for impl, m in models.items()}
    scale = np.abs(outs["reference"]).max()
    assert np.abs(outs["auto"] - outs["reference"]).max() <= 0.05 * scale
