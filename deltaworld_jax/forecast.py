"""Forecast the future of a video with DeltaWorld and draw the sampled futures.

    python -m deltaworld_jax.forecast --video=clip.mp4 --num_samples=8 --context=4 --horizon=3 \
        --stride=0.2 --size=512 --vfm=facebook/dinov3-vitb16-pretrain-lvd1689m \
        --tokenizer=deltatok/pytorch_model.bin --world=deltaworld/pytorch_model.bin \
        [--rgb_head=rgb_head.pth] --out=forecast_out

Reads `context` frames `stride` seconds apart from --start (PyAV), resizes the short side to --size and
centre-crops a square, runs the frozen VFM, and samples --num_samples futures of --horizon frames. When the
video continues past the context, the true future frames are read too: the pictures then show them and the
best sample (lowest smooth-L1 of the last frame to the truth, as the official evaluation picks it).

Weights: --vfm is `pixel` (the parameter-free pixel-patch VFM, --patch_size, --position_channels) or DINOv3
weights (HF folder, file or hub id); --tokenizer / --world are DeltaTok / DeltaWorld weights: the official
files (the released pytorch_model.bin, a Lightning .ckpt, .safetensors) or one of OUR training runs (its
workdir or checkpoints folder: the latest step's parameters are read, sizes inferred from them). Futures are
drawn through the RGB head when --rgb_head is given, as pixels with the pixel VFM, and otherwise as a feature
PCA fit on the context (and truth).

Writes <out>/forecast.png (rows: frames/truth, best, mean, samples), <out>/forecast.gif and .mp4
(the context then each future step, all samples side by side).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from absl import app, flags, logging
from PIL import Image

_VIDEO = flags.DEFINE_string("video", None, "Input video file (anything PyAV/FFmpeg reads).")
_OUT = flags.DEFINE_string("out", "forecast_out", "Output folder.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 8, "Sampled futures.")
_CONTEXT = flags.DEFINE_integer("context", 4, "Context frames.")
_HORIZON = flags.DEFINE_integer("horizon", 3, "Frames to forecast.")
_STRIDE = flags.DEFINE_float("stride", 0.2, "Seconds between frames.")
_START = flags.DEFINE_float("start", 0.0, "Time (s) of the first context frame.")
_SIZE = flags.DEFINE_integer("size", 512, "Square frame size (a multiple of the VFM patch size).")
_VFM = flags.DEFINE_string("vfm", None, "'pixel' or DINOv3 weights (HF folder, checkpoint file or hub id).")
_PATCH = flags.DEFINE_integer("patch_size", 16, "Patch size of the pixel VFM.")
_POSITION = flags.DEFINE_integer("position_channels", 0, "Position channels of the pixel VFM (configs/demo.py: 16).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "DeltaTok weights.")
_WORLD = flags.DEFINE_string("world", None, "DeltaWorld weights.")
_WORLD_HEADS = flags.DEFINE_integer("world_num_heads", 12, "DeltaWorld predictor heads (not in the weights).")
_WORLD_ROPE = flags.DEFINE_list("world_rope_axis_sizes", ["60"], "DeltaWorld RoPE rotated dims per head.")
_WORLD_UNROTATED = flags.DEFINE_integer("world_rope_unrotated_size", 4, "DeltaWorld unrotated dims per head.")
_RGB_HEAD = flags.DEFINE_string("rgb_head", None, "Optional RGB head weights (official rgb head).")
_RGB_HEADS = flags.DEFINE_integer("rgb_head_num_heads", 16, "RGB head decoder heads.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_FPS = flags.DEFINE_float("animation_fps", 4.0, "Frame rate of the animation.")


class ForecastInputError(ValueError):
    """The video or weights given to the forecast command cannot be used (the message says why)."""


# ----------------------------------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------------------------------


def read_clip(path: str, *, start: float, stride: float, count: int, min_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to `count` RGB frames nearest to start + i*stride (i < count), with their timestamps (s, relative to
    the first); fewer than `min_count` available frames is an error."""
    import av

    if not os.path.isfile(path):
        raise ForecastInputError(f"video not found: {path}")
    wanted = start + stride * np.arange(count)
    decoded: list[tuple[float, np.ndarray]] = []
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                decoded.append((float(frame.time), frame.to_ndarray(format="rgb24")))
                if frame.time > wanted[-1] + stride:
                    break
    except (av.error.FFmpegError, OSError, IndexError, ValueError) as e:
        raise ForecastInputError(f"cannot read video {path}: {type(e).__name__}: {e}") from None
    if not decoded:
        raise ForecastInputError(f"cannot read video {path}: no decodable video frames")
    times = np.array([t for t, _ in decoded])
    last = times[-1] + (times[-1] - times[-2] if len(times) > 1 else 0.0) / 2
    picked = [int(np.argmin(np.abs(times - t))) for t in wanted if t <= last]
    if len(picked) < min_count or len(set(picked)) < len(picked):
        raise ForecastInputError(
            f"{path} is too short: {min_count} distinct frames {stride}s apart from {start}s are needed, the video "
            f"has {len(times)} frames spanning {times[0]:.2f}-{times[-1]:.2f}s")
    frames = np.stack([decoded[i][1] for i in picked])
    stamps = np.array([decoded[i][0] for i in picked], np.float32)
    return frames, stamps - stamps[0]


def square_resize(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to `size` (bilinear) and centre-crop a size x size square."""
    h, w = frames.shape[1:3]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.stack([np.asarray(Image.fromarray(f).resize((nw, nh), Image.BILINEAR))[top:top + size, left:left + size]
                     for f in frames])


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


def read_training_checkpoint(directory: str, kind: str) -> dict[str, np.ndarray] | None:
    """Our own training run's weights under the OFFICIAL names, or None if `directory` holds no Orbax
    checkpoint. `directory` is a run's workdir (with checkpoints/) or its checkpoints folder; the latest
    step's `params` item is read and renamed (Linear kernels transposed back to torch weights), so the
    official loaders (which infer every size from the tensors) build the model: no config needed."""
    from etils import epath

    from deltaworld_jax.training.checkpointing import PARAMS, checkpoint_steps

    folder = epath.Path(directory)
    if (folder / "checkpoints").is_dir():
        folder = folder / "checkpoints"
    if not folder.is_dir() or not checkpoint_steps(str(folder)):
        return None
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(folder, item_handlers={PARAMS: ocp.StandardCheckpointHandler()},
                                    options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    step = manager.latest_step()
    params = manager.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore()}))[PARAMS]
    manager.close()
    logging.info("read %s weights from %s step %d", kind, folder, step)

    flat: dict[tuple, np.ndarray] = {}

    def walk(tree, path):
        if isinstance(tree, dict):
            for key, value in tree.items():
                walk(value, path + (str(key),))
        else:
            flat[path] = np.asarray(tree)

    walk(params, ())
    if kind == "world":
        from deltaworld_jax.pretrained.world import world_key_map

        num_layers = 1 + max(int(p[2]) for p in flat if p[:2] == ("predictor", "blocks"))
        with_q_embed = ("q_embed",) in flat
        ours = {tuple(str(x) for x in path): (name, transpose)
                for name, (path, transpose) in world_key_map(num_layers, with_q_embed).items()}
        missing = sorted(".".join(p) for p in flat if p not in ours)
        if missing:
            raise ForecastInputError(f"{directory}: not a DeltaWorld checkpoint (unknown entries {missing[:5]})")
        return {ours[p][0]: (a.T if ours[p][1] else a) for p, a in flat.items()}
    # DeltaTok: the official names are our paths, with Linear kernels as transposed weights.
    return {".".join(p[:-1] + ("weight",)) if p[-1] == "kernel" else ".".join(p): (a.T if p[-1] == "kernel" else a)
            for p, a in flat.items()}


def _need(path: str | None, flag: str) -> str:
    if not path:
        raise ForecastInputError(f"--{flag} is required")
    if path != "pixel" and not os.path.exists(path) and not (flag == "vfm" and path.count("/") == 1):
        raise ForecastInputError(f"--{flag}: weights not found at {path}")
    return path


def load_models(vfm: str, tokenizer: str, world: str, *, patch_size: int = 16, position_channels: int = 0,
                world_num_heads: int = 12,
                world_rope_axis_sizes=(60,), world_rope_unrotated_size: int = 4, rgb_head: str | None = None,
                rgb_head_num_heads: int = 16) -> dict[str, Any]:
    """{'vfm', 'tokenizer', 'world', 'rgb_head' (or None)} from the weights' paths."""
    from deltaworld_jax.models.dinov3 import PixelPatchVFM
    from deltaworld_jax.pretrained import load_deltaworld, load_dinov3, load_head
    from deltaworld_jax.pretrained.deltatok import load_deltatok

    if _need(vfm, "vfm") == "pixel":
        vfm_model = PixelPatchVFM(patch_size=patch_size, num_position_channels=position_channels)
    else:
        vfm_model = load_dinov3(vfm)
    tok_source = read_training_checkpoint(_need(tokenizer, "tokenizer"), "tokenizer") or tokenizer
    tok = load_deltatok(tok_source, vfm=vfm_model)
    world_source = read_training_checkpoint(_need(world, "world"), "world") or world
    world_model = load_deltaworld(world_source, tokenizer=tok, num_heads=world_num_heads,
                                  rope_axis_sizes=tuple(int(s) for s in world_rope_axis_sizes),
                                  rope_unrotated_size=world_rope_unrotated_size)
    head = None
    if rgb_head:
        if not hasattr(vfm_model, "norm"):
            raise ForecastInputError("--rgb_head decodes DINOv3 features; the pixel VFM needs no RGB head")
        head = load_head(_need(rgb_head, "rgb_head"), "rgb-head-imagenet",
                         norm_weight=np.asarray(vfm_model.norm.weight[...]),
                         norm_bias=np.asarray(vfm_model.norm.bias[...]), num_heads=rgb_head_num_heads)
    return {"vfm": vfm_model, "tokenizer": tok, "world": world_model, "rgb_head": head}


# ----------------------------------------------------------------------------------------------------
# Forecast and pictures
# ----------------------------------------------------------------------------------------------------


def forecast_features(models: dict[str, Any], frames: np.ndarray, timestamps: np.ndarray, *, context: int,
                      horizon: int, stride: float, num_samples: int, seed: int = 0) -> dict[str, Any]:
    """Sample futures: {'rollouts' [S, horizon, N, D], 'context' [c, N, D], 'truth' [k, N, D] (k <= horizon true
    future frames read from the video), 'best' index or None, 'grid_hw'}."""
    import jax
    import jax.numpy as jnp

    from deltaworld_jax.training.forecasters import jit_deltaworld_rollout, select_samples, Forecast, world_criterion
    from deltaworld_jax.training.evaluation import vfm_features

    vfm = models["vfm"]
    grid_hw = tuple(vfm.grid_hw(frames.shape))
    feats = vfm_features(vfm, jnp.asarray(frames[None]))  # [1, T, N, D]
    black = vfm_features(vfm, jnp.zeros((1, *frames.shape[1:]), jnp.uint8))
    known_future = frames.shape[0] - context
    # The rollout takes the future frames only as targets: pad unknown ones, and extend the timestamps.
    future_feats = jnp.concatenate([feats[:, context:], jnp.zeros_like(feats[:, :horizon - known_future])], 1)
    clip_feats = jnp.concatenate([feats[:, :context], future_feats], 1)
    times = np.concatenate([timestamps[:context], timestamps[context - 1] + stride * np.arange(1, horizon + 1)])
    times[context:context + known_future] = timestamps[context:]
    rollouts, _ = jit_deltaworld_rollout(models["world"], models["tokenizer"], clip_feats,
                                         jnp.asarray(times[None], jnp.float32), black, jax.random.key(seed),
                                         ctx_len=context, grid_hw=grid_hw, num_samples=num_samples)
    best = None
    if known_future == horizon and num_samples > 1:
        selection = select_samples(Forecast(rollouts, feats[:, context:], feats[:, :context], context),
                                   world_criterion)
        best = int(selection["best"][1][0])
    return {"rollouts": np.asarray(rollouts[0]), "context": np.asarray(feats[0, :context]),
            "truth": np.asarray(feats[0, context:]), "best": best, "grid_hw": grid_hw}


def decode_features(models: dict[str, Any], result: dict[str, Any]):
    """A function features [k, N, D] -> list of float images [H, W, 3] in [0, 1], and its name."""
    from deltaworld_jax.models.dinov3 import PixelPatchVFM
    from deltaworld_jax.training import pictures

    vfm, grid_hw = models["vfm"], result["grid_hw"]
    if models["rgb_head"] is not None:
        head = models["rgb_head"]
        def rgb(f):
            f = np.asarray(f, np.float32)
            return [pictures.rgb_image(x) for x in np.asarray(pictures.apply_head(head, f.reshape(-1, *grid_hw, f.shape[-1])))]

        return rgb, "rgb"
    if isinstance(vfm, PixelPatchVFM):
        return lambda f: [pictures.frame_image(x) for x in np.asarray(vfm.patches_to_frames(np.asarray(f), grid_hw))], \
            "pixels"
    fit_on = np.concatenate([result["context"], result["truth"]])

    def pca(f):
        return pictures.feature_pca(fit_on, np.asarray(f), grid_hw=grid_hw)[1]

    return pca, "pca"


def draw(models: dict[str, Any], frames: np.ndarray, result: dict[str, Any], out_dir: str,
         fps: float = 4.0) -> dict[str, str]:
    """Write forecast.png (grid), forecast.gif and forecast.mp4; returns their paths."""
    from deltaworld_jax.training import pictures

    decode, how = decode_features(models, result)
    context = result["context"].shape[0]
    rollouts = result["rollouts"]
    futures = {}
    if result["best"] is not None:
        futures["best"] = decode(rollouts[result["best"]])
    futures["mean"] = decode(rollouts.mean(0))
    futures.update({f"sample {i}": decode(r) for i, r in enumerate(rollouts)})
    frame_imgs = [pictures.frame_image(f) for f in frames]
    truth_imgs = frame_imgs[context:] if len(frame_imgs) > context else None
    grid = pictures.futures_picture(frame_imgs[:context], truth_imgs, futures)
    paths = {"grid": pictures.write_png(grid, os.path.join(out_dir, "forecast.png"))}
    # Animation: the context (repeated in every panel), then each step with every sample side by side.
    panels = ["truth"] * (truth_imgs is not None) + list(futures)
    steps = []
    for t in range(context + rollouts.shape[1]):
        if t < context:
            row = [frame_imgs[t]] * len(panels)
        else:
            k = t - context
            row = ([frame_imgs[t] if t < len(frame_imgs) else None] if truth_imgs is not None else [])
            row += [futures[name][k] for name in futures]
        steps.append(pictures.grid_image([row], len(panels)))
    paths["gif"] = pictures.write_animation(steps, os.path.join(out_dir, "forecast.gif"), fps=fps)
    paths["mp4"] = pictures.write_animation(steps, os.path.join(out_dir, "forecast.mp4"), fps=fps)
    logging.info("futures drawn as %s: %s", how, paths)
    return paths


def run(*, video: str, out: str, vfm: str, tokenizer: str, world: str, num_samples: int = 8, context: int = 4,
        horizon: int = 3, stride: float = 0.2, start: float = 0.0, size: int = 512, patch_size: int = 16,
        position_channels: int = 0, world_num_heads: int = 12, world_rope_axis_sizes=(60,),
        world_rope_unrotated_size: int = 4,
        rgb_head: str | None = None, rgb_head_num_heads: int = 16, seed: int = 0, fps: float = 4.0) -> dict[str, str]:
    """The whole command; returns the written paths."""
    if context < 1 or horizon < 1 or num_samples < 1 or stride <= 0:
        raise ForecastInputError("--context, --horizon, --num_samples must be >= 1 and --stride > 0")
    # Cheap checks first, before reading the video or loading anything.
    for path, flag in ((vfm, "vfm"), (tokenizer, "tokenizer"), (world, "world"), (rgb_head, "rgb_head")):
        if flag != "rgb_head" or rgb_head:
            _need(path, flag)
    frames, timestamps = read_clip(video, start=start, stride=stride, count=context + horizon, min_count=context)
    models = load_models(vfm, tokenizer, world, patch_size=patch_size, position_channels=position_channels,
                         world_num_heads=world_num_heads,
                         world_rope_axis_sizes=world_rope_axis_sizes,
                         world_rope_unrotated_size=world_rope_unrotated_size, rgb_head=rgb_head,
                         rgb_head_num_heads=rgb_head_num_heads)
    if size % models["vfm"].patch_size:
        raise ForecastInputError(f"--size {size} is not a multiple of the VFM patch size {models['vfm'].patch_size}")
    frames = square_resize(frames, size)
    result = forecast_features(models, frames, timestamps, context=context, horizon=horizon, stride=stride,
                               num_samples=num_samples, seed=seed)
    return draw(models, frames, result, out, fps=fps)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _VIDEO.value:
        raise app.UsageError("--video is required")
    try:
        paths = run(video=_VIDEO.value, out=_OUT.value, vfm=_VFM.value, tokenizer=_TOKENIZER.value,
                    world=_WORLD.value, num_samples=_NUM_SAMPLES.value, context=_CONTEXT.value,
                    horizon=_HORIZON.value, stride=_STRIDE.value, start=_START.value, size=_SIZE.value,
                    patch_size=_PATCH.value, position_channels=_POSITION.value, world_num_heads=_WORLD_HEADS.value,
                    world_rope_axis_sizes=_WORLD_ROPE.value, world_rope_unrotated_size=_WORLD_UNROTATED.value,
                    rgb_head=_RGB_HEAD.value, rgb_head_num_heads=_RGB_HEADS.value, seed=_SEED.value,
                    fps=_FPS.value)
    except ForecastInputError as e:
        raise app.UsageError(str(e)) from None
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))


if __name__ == "__main__":
    app.run(main)
