"""Basic layers shared by the models: initialisers, `linear`, LayerNorm (float32, with a hand-written
gradient), LayerScale (folded into a branch's last projection by `scaled_linear`), MLPs and `count_params`.

Layout conventions: tokens are [batch, length, hidden]; attention heads are [batch, length, heads, head_dim]
(the layout `jax.nn.dot_product_attention` takes). `dtype` is the compute dtype, `param_dtype` the storage
dtype of parameters; norms, softmax and RoPE angles are computed in float32.

Parameters carry logical axis names (see `deltaworld_jax/sharding.py` for the mapping to mesh axes):
  embed: the model width          mlp: the MLP width          heads: the flattened heads x head_dim
  vocab: per-head / output-size axes that are never sharded     norm: small vectors (scales, biases)
  layers: the leading layer axis of a BlockStack's parameters (block_stack.LAYER_AXIS; the mesh rules map it
          to none)
Submodule names follow the official PyTorch/`transformers` names so weight import is a plain rename.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array


def trunc_normal(std: float) -> nnx.Initializer:
    """Truncated normal at +-2 std, as `torch.nn.init.trunc_normal_(std=...)` (cut at +-2 absolute, which
    equals +-2 std only for std=1; for std=0.02 torch's cut is effectively no cut, so we use a plain
    truncation at 2 std, the statistically sensible reading that every JAX port uses)."""
    return nnx.initializers.truncated_normal(stddev=std, lower=-2.0, upper=2.0)


def linear(
    in_features: int,
    out_features: int,
    *,
    axes: tuple[str | None, str | None],
    use_bias: bool = True,
    init_std: float = 0.02,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """nnx.Linear with truncated-normal weights, zero bias and logical axis names on both."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(trunc_normal(init_std), axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32; returns `dtype` (the compute dtype). `use_bias=False` gives the
    bias-free norm DeltaTok's QK-norm uses."""

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        del rngs
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(jnp.ones((num_features,), param_dtype), out_sharding=("norm",))
        self.bias = (
            nnx.Param(jnp.zeros((num_features,), param_dtype), out_sharding=("norm",))
            if use_bias
            else None
        )

    def __call__(self, x: Array) -> Array:
        bias = None if self.bias is None else self.bias[...].astype(jnp.float32)
        y = layer_norm_f32(x.astype(jnp.float32), self.weight[...].astype(jnp.float32), bias, self.eps)
        return y.astype(self.dtype)


def _normalise(x: Array, eps: float) -> tuple[Array, Array]:
    """(x - mean) / sqrt(var + eps) over the last axis, and 1 / sqrt(var + eps); float32."""
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
    return centred * inv_std, inv_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_f32(x: Array, weight: Array, bias: Array | None, eps: float) -> Array:
    """LayerNorm over the last axis, all float32, with its gradient written out by hand.

    Why a hand-written gradient: autodiff of the two-pass forward (mean, then the variance of x - mean) gives
    XLA:CPU a graph it runs 4-5x slower than the textbook form below (forward + backward of 8 stacked norms on
    [16, 129, 192]: 19.5-20.8 ms vs 4.0-4.7 ms); the values agree to float32 rounding (2e-7 relative). The forward
    is the same expression as before, so outputs are unchanged."""
    return _layer_norm_fwd(x, weight, bias, eps)[0]


def _layer_norm_fwd(x, weight, bias, eps):
    normed, inv_std = _normalise(x, eps)
    y = normed * weight
    return (y if bias is None else y + bias), (normed, inv_std, weight, bias is None)


def _layer_norm_bwd(eps, residuals, dy):
    del eps
    normed, inv_std, weight, no_bias = residuals
    g = dy * weight
    dx = inv_std * (g - jnp.mean(g, axis=-1, keepdims=True)
                    - normed * jnp.mean(g * normed, axis=-1, keepdims=True))
    leading = tuple(range(dy.ndim - 1))
    return dx, jnp.sum(dy * normed, axis=leading), None if no_bias else jnp.sum(dy, axis=leading)


layer_norm_f32.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerScale(nnx.Module):
    """Per-channel residual scale (`lambda1` in DINOv3), initialised to `init_value`: the parameter only (its
    module path is the official checkpoints' name). The blocks apply it folded into their branch's last
    projection (`scaled_linear`): the same function as branch(x) * lambda1, with a cheaper gradient."""

    def __init__(self, dim: int, *, init_value: float, param_dtype=jnp.float32, rngs: nnx.Rngs):
        del rngs
        self.lambda1 = nnx.Param(jnp.full((dim,), init_value, param_dtype), out_sharding=("norm",))


def scaled_linear(layer: nnx.Linear, x: Array, scale: Array | None) -> Array:
    """layer(x) * scale for a per-output-channel `scale` (LayerScale after a block's last projection), with
    the scale folded into the weights: x @ (W * scale) + b * scale.

    Why: written as (x @ W + b) * scale, the gradient of `scale` is an activation-sized product and reduction
    (sum over every token of (x @ W + b) * dy, with x @ W + b kept or recomputed for it), one per LayerScale
    per layer; folded, it is weight-sized (sum over W's rows of W * dW_folded), and the backward pass has no
    activation-sized work beyond the matmuls'. The forward differs from the unfolded one by rounding only
    (float32: ~1 ulp of the branch's update). The result is promoted as the unfolded product is (a bf16 compute
    dtype with a float32 scale gives float32, as torch's autocast does), so the update added to a float32
    residual stream is not left in bf16."""
    if scale is None:
        return layer(x)
    kernel = layer.kernel[...] * scale
    bias = layer.bias[...] * scale if layer.bias is not None else None
    x, kernel, bias = layer.promote_dtype((x, kernel, bias), dtype=layer.dtype)
    y = layer.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=layer.precision)
    if bias is not None:
        y = y + bias
    return y.astype(jnp.promote_types(y.dtype, scale.dtype))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    # torch's nn.GELU / transformers "gelu" is the exact (erf) GELU, not the tanh approximation.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


class MLP(nnx.Module):
    """up_proj -> activation -> down_proj (DINOv3ViTMLP); `gated`: down_proj(act(gate_proj(x)) * up_proj(x))
    (SwiGLU, DINOv3ViTGatedMLP)."""

    def __init__(self, hidden: int, intermediate: int, *, act: str = "gelu", gated: bool = False,
                 use_bias: bool = True, init_std: float = 0.02, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(use_bias=use_bias, init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = act
        self.gated = gated
        if gated:  # first: the official module's order of initialisation
            self.gate_proj = linear(hidden, intermediate, axes=("embed", "mlp"), **kw)
        self.up_proj = linear(hidden, intermediate, axes=("embed", "mlp"), **kw)
        self.down_proj = linear(intermediate, hidden, axes=("mlp", "embed"), **kw)

    def __call__(self, x: Array, out_scale: Array | None = None) -> Array:
        """`out_scale`: a LayerScale's lambda, folded into down_proj (scaled_linear)."""
        if self.gated:
            hidden = ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x)
        else:
            hidden = ACTIVATIONS[self.act](self.up_proj(x))
        return scaled_linear(self.down_proj, hidden, out_scale)


class GatedMLP(MLP):
    """The SwiGLU MLP (DINOv3ViTGatedMLP): MLP(gated=True), SiLU by default."""

    def __init__(self, hidden: int, intermediate: int, *, act: str = "silu", **kwargs):
        super().__init__(hidden, intermediate, act=act, gated=True, **kwargs)


def count_params(module: nnx.Module) -> int:
    """Number of parameters (nnx.Param leaves) in a module, abstract or concrete."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))
