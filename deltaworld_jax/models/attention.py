"""Attention kernels per backend behind one option: `implementation`.

  "auto"       splash on TPU, cuDNN on GPU when the dtype and head size allow it, "xla" elsewhere (CPU);
               chosen at trace time from the platform of the mesh in context (`jax.set_mesh`), else of
               the default backend. Ahead-of-time compiles for TPU from a CPU host therefore pick splash.
  "xla"        the scores materialised as [B, H, Lq, Lk] by XLA's own ops, any backend: jax.nn's XLA path on
               TPU and GPU; on CPU the same function written heads-major (see _heads_major_attention).
  "cudnn"      jax.nn.dot_product_attention's fused cuDNN flash attention (GPU; bf16/fp16 only).
  "splash"     Pallas splash attention (TPU flash attention with block-sparse masks); runs in Pallas
               interpret mode elsewhere, which is how the CPU tests check it.
  "reference"  explicit einsum + float32 softmax: the ground truth of the tests.

Masks are either None (full attention), a dense boolean array broadcastable to [B, H, Lq, Lk] (True =
attend; "xla", "cudnn" and "reference" only), or a `FrameCausalMask`: the frame-causal mask of the world
models' predictor, kept as trace-time frame ids so splash can skip the masked blocks instead of reading a
dense mask. Full attention is the special case "every key in frame 0, every query in frame 1".

Splash needs sequence lengths that are multiples of its blocks (the ViTs have 1024 patches + 5 prefix
tokens, DeltaTok's encoder 2049): q, k, v are padded, and the padding stays out of every real query's
softmax through the mask itself (padded keys sit in a frame no real query sees; padded queries see every
key, so no row of the mask is empty, and their outputs are dropped). Under a mesh the kernel runs per device
on its shard of the batch (and of the heads when the `tensor` axis splits them), inside a shard_map: a
Pallas call is opaque to XLA's sharding propagation, which would otherwise gather it onto every device.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from deltaworld_jax import sharding as sharding_lib

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "reference")

# Splash blocks: the kernel's key blocks must be multiples of the 128 TPU lanes; larger blocks amortise the
# per-block work, so the largest of these that divides the (128-padded) length is taken.
_LANES = 128
_BLOCK_CHOICES = (512, 256, 128)
# Frame ids of the padding: real frame ids must stay below these.
_PAD_KEY_FRAME = np.iinfo(np.int32).max - 1  # no real query (frame < _PAD_KEY_FRAME) sees a padded key
_PAD_QUERY_FRAME = np.iinfo(np.int32).max  # a padded query sees every key, padded ones included


# ----------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class FrameCausalMask:
    """Query i attends key j iff k_frames[j] < q_frames[i] (the official predictor's `causal_mask`).

    Frame ids are numpy int arrays, i.e. trace-time constants (they depend on shapes only), so the mask
    is static: hashable, a pytree without leaves, and splash turns it into block-sparse metadata."""

    q_frames: np.ndarray  # [Lq] ints
    k_frames: np.ndarray  # [Lk] ints

    def __post_init__(self):
        for name in ("q_frames", "k_frames"):
            ids = np.asarray(getattr(self, name))
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"FrameCausalMask.{name} must be a 1-D integer array, got {ids.dtype}{ids.shape}")
            ids = ids.astype(np.int64)
            ids.setflags(write=False)
            object.__setattr__(self, name, ids)

    @classmethod
    def full(cls, q_len: int, k_len: int) -> "FrameCausalMask":
        """Every query sees every key."""
        return cls(np.ones((q_len,), np.int64), np.zeros((k_len,), np.int64))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q_frames.shape[0], self.k_frames.shape[0])

    def block(self, q_slice: slice, k_slice: slice) -> np.ndarray:
        """The boolean [q, k] block of the mask (numpy)."""
        return self.k_frames[k_slice][None, :] < self.q_frames[q_slice][:, None]

    def dense(self) -> Array:
        """[1, 1, Lq, Lk] boolean, for the paths that take dense masks."""
        return jnp.asarray(self.block(slice(None), slice(None)))[None, None]

    def padded(self, q_len: int, k_len: int) -> "FrameCausalMask":
        """The mask of q / k padded to q_len / k_len (see the module docstring for the padding frames)."""
        if self.q_frames.size and max(self.q_frames.max(), self.k_frames.max(initial=0)) >= _PAD_KEY_FRAME:
            raise ValueError(f"frame ids must be below {_PAD_KEY_FRAME}")
        q = np.concatenate([self.q_frames, np.full((q_len - self.shape[0],), _PAD_QUERY_FRAME, np.int64)])
        k = np.concatenate([self.k_frames, np.full((k_len - self.shape[1],), _PAD_KEY_FRAME, np.int64)])
        return FrameCausalMask(q, k)

    def _key(self):
        return (self.q_frames.tobytes(), self.k_frames.tobytes(), self.shape)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, FrameCausalMask) and self._key() == other._key()


jax.tree_util.register_static(FrameCausalMask)


def frame_causal_mask(q_frames, k_frames) -> FrameCausalMask | Array:
    """The predictor's frame-causal mask from the frame id of every query and key: a static
    `FrameCausalMask` when the ids are concrete (numpy, or jax arrays known at trace time), else (ids
    computed inside a traced function) the dense [1, 1, Lq, Lk] boolean array, which the dense paths take."""
    try:
        return FrameCausalMask(np.asarray(q_frames), np.asarray(k_frames))
    except jax.errors.TracerArrayConversionError:
        return (k_frames[None, :] < q_frames[:, None])[None, None]


def dense_mask(mask) -> Array | None:
    """None or a dense boolean array, from any mask this module takes."""
    return mask.dense() if isinstance(mask, FrameCausalMask) else mask


# ----------------------------------------------------------------------------------------------------
# Choosing the implementation
# ----------------------------------------------------------------------------------------------------


def check_implementation(implementation: str | None) -> str:
    """The implementation name, validated (None means "xla", jax.nn's own default)."""
    name = "xla" if implementation is None else implementation
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    return name


def resolve_implementation(implementation: str | None, q: Array, mask=None, platform: str | None = None) -> str:
    """The concrete implementation for these inputs: "auto" resolved on `platform` (default: the current
    one); any other name returned as is, after validation."""
    name = check_implementation(implementation)
    if name != "auto":
        return name
    platform = sharding_lib.current_platform() if platform is None else platform
    if platform == "tpu" and (mask is None or isinstance(mask, FrameCausalMask)):
        return "splash"
    head_dim = q.shape[-1]
    if (platform == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
            and head_dim <= 128):
        return "cudnn"
    return "xla"


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------


def dot_product_attention(q: Array, k: Array, v: Array, *, mask=None, implementation: str | None = "xla") -> Array:
    """softmax(q k^T / sqrt(hd)) v with [B, L, H, hd] inputs (see the module docstring for `mask` and
    `implementation`)."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[::3] != k.shape[::3]:
        raise ValueError(f"q, k, v must be [B, L, H, hd] with matching B, H, hd; got {q.shape}, {k.shape}, {v.shape}")
    if isinstance(mask, FrameCausalMask) and mask.shape != (q.shape[1], k.shape[1]):
        raise ValueError(f"mask covers {mask.shape} (queries, keys), attention has ({q.shape[1]}, {k.shape[1]})")
    name = resolve_implementation(implementation, q, mask)
    scale = q.shape[-1] ** -0.5
    if name == "splash":
        return splash_attention(q, k, v, mask=mask, interpret=sharding_lib.current_platform() != "tpu")
    mask = dense_mask(mask)
    if name == "reference":
        logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
        if mask is not None:
            logits = jnp.where(mask, logits, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    if name == "xla" and q.dtype in _HEADS_MAJOR_DTYPES and sharding_lib.current_platform() == "cpu":
        return _heads_major_attention(q, k, v, mask, scale)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=name)


# The dot algorithm of q k^T per input dtype, as jax.nn's XLA path picks it (bf16 products, float32 sums: an
# explicit algorithm keeps the backward pass's dtypes consistent, jax issue 24047).
_HEADS_MAJOR_DTYPES = {jnp.dtype(jnp.float32): None, jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32}
# jax.nn's value for masked logits (not -inf: a query that sees no key gets uniform weights, not NaN).
_MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)


def _heads_major_attention(q: Array, k: Array, v: Array, mask: Array | None, scale: float) -> Array:
    """jax.nn.dot_product_attention's XLA path (float32 logits and softmax, weights cast to v's dtype), written
    for XLA:CPU: q, k, v transposed to [B, H, L, hd] before the two matmuls, and q scaled before q k^T when
    the scale is a power of two (then the product is exactly the scaled logits, and the scale costs an [L, hd]
    pass instead of an [L, L] one). float32 and bfloat16 inputs; other dtypes take jax.nn's path.

    Interleaved fresh-process pairs of the side-by-side steps (benchmarks/RESULTS.md, session 14): DINO-World,
    DeltaWorld and the forecast 4-10% faster, DeltaTok within noise. The TPU program gains nothing from it
    (AOT DeltaTok 256px: temporaries +0.07%), so the other backends keep jax.nn's form."""
    power_of_two = math.frexp(scale)[0] == 0.5
    if power_of_two:
        q = q * jnp.asarray(scale, q.dtype)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=_HEADS_MAJOR_DTYPES[q.dtype],
                        preferred_element_type=jnp.float32)
    if not power_of_two:
        logits = logits * jnp.float32(scale)
    if mask is not None:
        logits = jnp.where(mask, logits, _MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------------------------------
# Splash attention (Pallas, TPU)
# ----------------------------------------------------------------------------------------------------


def _padded_length_and_block(length: int) -> tuple[int, int]:
    padded = -(-length // _LANES) * _LANES
    return padded, next(b for b in _BLOCK_CHOICES if padded % b == 0)


@functools.lru_cache(maxsize=None)
def _splash_mask_class():
    """One class for the whole process: splash caches its mask processing on mask equality."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    class SplashFrameCausalMask(mask_lib.Mask):
        """A FrameCausalMask as splash's Mask interface: blocks computed from the frame ids on demand."""

        def __init__(self, mask: FrameCausalMask):
            self.mask = mask

        @property
        def shape(self):
            return self.mask.shape

        def __getitem__(self, idx):
            q_slice, k_slice = idx
            return self.mask.block(q_slice, k_slice)

        def __eq__(self, other):
            return isinstance(other, SplashFrameCausalMask) and self.mask == other.mask

        def __hash__(self):
            return hash((SplashFrameCausalMask, self.mask))

    return SplashFrameCausalMask


def _splash_kernel(mask: FrameCausalMask, num_heads: int, block_q: int, block_kv: int, interpret: bool):
    """The splash kernel (with its block-sparse mask metadata) for one padded mask and head count.

    Built anew in every trace and never cached here: the kernel holds its metadata as jax arrays, which
    inside a trace are that trace's values (a cached kernel would leak them into other traces). The numpy
    work of turning the mask into blocks is cached by splash itself, on the mask's equality."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    head_mask = _splash_mask_class()(mask)
    blocks = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                               block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                               block_q_dq=block_q, block_kv_dq=block_kv)
    return splash.make_splash_mha(splash.MultiHeadMask([head_mask] * num_heads), block_sizes=blocks,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q: Array, k: Array, v: Array, mask: FrameCausalMask, interpret: bool) -> Array:
    """Splash on one device's arrays [b, L, h, hd]: pad, run the kernel per example, unpad."""
    _, lq, h, hd = q.shape
    lk = k.shape[1]
    lq_pad, block_q = _padded_length_and_block(lq)
    lk_pad, block_kv = _padded_length_and_block(lk)
    kernel = _splash_kernel(mask.padded(lq_pad, lk_pad), h, block_q, block_kv, interpret)

    def to_kernel_layout(x, padded):  # [b, L, h, hd] -> [b, h, L_padded, hd]
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, padded - x.shape[2]), (0, 0)))

    # The kernel does not scale the logits: fold 1/sqrt(hd) into q (a power of two for hd = 64, so exact).
    q = (q.astype(jnp.float32) * hd**-0.5).astype(q.dtype)
    out = jax.vmap(kernel)(to_kernel_layout(q, lq_pad), to_kernel_layout(k, lk_pad), to_kernel_layout(v, lk_pad))
    return jnp.swapaxes(out[:, :, :lq], 1, 2)


def kernel_partition_spec(mesh, batch: int, num_heads: int) -> PartitionSpec:
    """How the kernel's [B, L, H, hd] operands split over `mesh`: the batch over the batch axes (those of
    them that divide it), the heads over `tensor` when it divides them; sequences and head_dim whole."""
    batch_axes, ways = [], 1
    for axis in sharding_lib.BATCH_AXES:
        size = mesh.shape.get(axis, 1)
        if size > 1 and batch % (ways * size) == 0:
            batch_axes.append(axis)
            ways *= size
    tensor = mesh.shape.get("tensor", 1)
    head_axis = "tensor" if tensor > 1 and num_heads % tensor == 0 else None
    batch_spec = None if not batch_axes else (batch_axes[0] if len(batch_axes) == 1 else tuple(batch_axes))
    return PartitionSpec(batch_spec, None, head_axis, None)


def splash_attention(q: Array, k: Array, v: Array, *, mask: FrameCausalMask | None = None,
                     interpret: bool = False) -> Array:
    """Splash attention of [B, L, H, hd] q, k, v (softmax scale 1/sqrt(hd)) under a static mask (None: full).

    interpret: run the Pallas kernel in interpret mode (any backend; slow; for tests)."""
    if mask is None:
        mask = FrameCausalMask.full(q.shape[1], k.shape[1])
    if not isinstance(mask, FrameCausalMask):
        raise ValueError("splash attention takes a FrameCausalMask (static frame ids) or None, not a dense "
                         f"{type(mask).__name__} mask; give the mask as frame ids, or use implementation='xla'")
    run = functools.partial(_splash_local, mask=mask, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return run(q, k, v)
    spec = kernel_partition_spec(mesh, q.shape[0], q.shape[2])
    return jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
