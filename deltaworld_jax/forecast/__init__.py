"""Forecast the futures of a camera video with DeltaWorld, score them, and draw them.

    python -m deltaworld_jax.forecast --video=clip.mp4 --num_samples=8 --context=4 --horizon=3 \
        --stride=0.2 --size=512 --vfm=facebook/dinov3-vitb16-pretrain-lvd1689m \
        --tokenizer=Amazon-FAR/deltatok-kinetics --world=Amazon-FAR/deltaworld-kinetics --out=forecast_out

Reads `context` frames `stride` seconds apart, from --start seconds after the video's FIRST frame (so a
stream stamped from 0.54 s, B-frames or a variable frame rate read the same as any other), in any
container PyAV decodes (data/video.py). When the video goes on past the context, the true future frames
are read too: they score every sampled future and pick the best one (lowest smooth-L1 of the last
frame to the truth, as the official evaluation picks it).

--crop (how a wide frame meets the model): `full` keeps the whole frame as a non-square patch grid
(short side --size, long side rounded to whole patches); `two_squares` forecasts two overlapping
squares at the frame's ends (the official evaluation of wide frames) and puts them back together for
the pictures; `center` keeps the centre square only.

Weights: --vfm is `pixel` (the parameter-free pixel-patch VFM, --patch_size, --position_channels) or DINOv3
weights; --tokenizer / --world / --rgb_head / --seg_head / --depth_head are the official files
(pytorch_model.bin, a Lightning .ckpt, .safetensors), a folder holding one, a Hugging Face hub id
(Amazon-FAR/deltatok-kinetics, Amazon-FAR/deltaworld-kinetics, Amazon-FAR/seg-head-vspw, ...), or, for
--tokenizer / --world, one of OUR training runs (its workdir or checkpoints folder; the model config the
trainer records there gives its sizes). Sizes the weights do not carry (DeltaWorld's heads and RoPE split,
the RGB head's heads) come from the flag, else from the repository's config.json (or our run's recorded
model config, which a flag must agree with), else the released values.

Writes to --out: forecast.png (rows named: frames, best, mean, samples; the context columns marked),
forecast.gif and forecast.mp4 (context, then each future step, all samples side by side), segmentation.png /
depth.png when heads are given, summary.json and summary.md (frame times used, per-sample error against
the true future, best sample, mean of the samples and copy-last).

`--videos=DIR` forecasts and scores every video of a folder instead (folder.py beside this file): the official
protocol (fixed stride, 4 context frames, horizons 1 and 3), best / mean / copy-last per horizon.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from absl import app, flags, logging

from deltaworld_jax.forecast import folder as forecast_folder
# The library (inputs.py: clips, crops, weights, checks; outputs.py: forecasts, scores, pictures, summaries;
# folder.py: a folder of videos), importable from here as before (forecast.read_clip, load_models, ...).
from deltaworld_jax.forecast.inputs import (  # noqa: F401
    CROPS, DEFAULT_CROP, RELEASED_RGB_HEADS, RELEASED_WORLD_HEADS, RELEASED_WORLD_ROPE, RELEASED_WORLD_UNROTATED,
    Clip, ForecastInputError, check_source, crop_views, full_resize, is_hub_id, load_clip, load_models, progress,
    read_clip, read_training_run, resize_frames, resolve_weights, stitch, validate,
    world_sizes)
from deltaworld_jax.forecast.outputs import (  # noqa: F401
    HEADER_HEIGHT, decode_features, draw, draw_heads, feature_error, forecast_features, forecast_views,
    labelled_grid, patch_size_of, score, summarise, summary_markdown, upscale_factor, write_summary)

_VIDEO = flags.DEFINE_string("video", None, "Input video file (any container PyAV/FFmpeg reads).")
_VIDEOS = flags.DEFINE_string("videos", None, "A folder of videos to forecast and score (instead of --video).")
_OUT = flags.DEFINE_string("out", "forecast_out", "Output folder.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 8, "Sampled futures.")
_CONTEXT = flags.DEFINE_integer("context", 4, "Context frames.")
_HORIZON = flags.DEFINE_integer("horizon", 3, "Frames to forecast (--videos: the largest horizon scored).")
_STRIDE = flags.DEFINE_float("stride", 0.2, "Seconds between frames.")
_START = flags.DEFINE_float("start", 0.0, "Seconds after the video's first frame of the first context frame.")
_SIZE = flags.DEFINE_integer("size", 512, "Short side of the frames fed to the VFM (a multiple of its patch size).")
_CROP = flags.DEFINE_enum("crop", DEFAULT_CROP, list(CROPS), "How wide frames are fed: the whole frame as a "
                          "non-square grid, two overlapping squares (the official evaluation), or the centre square.")
_VFM = flags.DEFINE_string("vfm", None, "'pixel' or DINOv3 weights (HF folder, checkpoint file or hub id).")
_PATCH = flags.DEFINE_integer("patch_size", 16, "Patch size of the pixel VFM.")
_POSITION = flags.DEFINE_integer("position_channels", 0, "Position channels of the pixel VFM (configs/demo.py: 16).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "DeltaTok weights (file, folder, hub id or training run).")
_WORLD = flags.DEFINE_string("world", None, "DeltaWorld weights (file, folder, hub id or training run).")
_WORLD_HEADS = flags.DEFINE_integer("world_num_heads", None, "DeltaWorld predictor heads (not in the weights; "
                                    f"default: the repo's config.json, else {RELEASED_WORLD_HEADS}).")
_WORLD_ROPE = flags.DEFINE_list("world_rope_axis_sizes", None, "DeltaWorld RoPE rotated dims per head "
                                f"(default: config.json, else {RELEASED_WORLD_ROPE[0]}).")
_WORLD_UNROTATED = flags.DEFINE_integer("world_rope_unrotated_size", None, "DeltaWorld unrotated dims per head "
                                        f"(default: config.json, else {RELEASED_WORLD_UNROTATED}).")
_RGB_HEAD = flags.DEFINE_string("rgb_head", None, "Optional RGB head weights (file or hub id).")
_RGB_HEADS = flags.DEFINE_integer("rgb_head_num_heads", None, "RGB head decoder heads (default: config.json, "
                                  f"else {RELEASED_RGB_HEADS}).")
_SEG_HEAD = flags.DEFINE_string("seg_head", None, "Optional segmentation probe (e.g. Amazon-FAR/seg-head-vspw).")
_SEG_KIND = flags.DEFINE_enum("seg_head_kind", "vspw", ["vspw", "cityscapes"], "Classes of --seg_head.")
_DEPTH_HEAD = flags.DEFINE_string("depth_head", None, "Optional depth probe (e.g. Amazon-FAR/depth-head-kitti).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_FPS = flags.DEFINE_float("animation_fps", 4.0, "Frame rate of the animation.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "--videos: clips per compiled batch.")
_MAX_VIDEOS = flags.DEFINE_integer("max_videos", 0, "--videos: score at most this many (0: all).")
_PICTURES = flags.DEFINE_integer("pictures", 4, "--videos: clips drawn as pictures.")

def run(*, video: str, out: str, vfm: str, tokenizer: str, world: str, num_samples: int = 8, context: int = 4,
        horizon: int = 3, stride: float = 0.2, start: float = 0.0, size: int = 512, crop: str = DEFAULT_CROP,
        patch_size: int = 16, position_channels: int = 0, world_num_heads: int | None = None,
        world_rope_axis_sizes=None, world_rope_unrotated_size: int | None = None, rgb_head: str | None = None,
        rgb_head_num_heads: int | None = None, seg_head: str | None = None, seg_head_kind: str = "vspw",
        depth_head: str | None = None, seed: int = 0, fps: float = 4.0, models: dict | None = None) -> dict[str, str]:
    """The whole command for one video; returns the written paths (pictures, summary.json, summary.md)."""
    validate(video=video, vfm=vfm, tokenizer=tokenizer, world=world, num_samples=num_samples, context=context,
             horizon=horizon, stride=stride, start=start, size=size, crop=crop, patch_size=patch_size,
             rgb_head=rgb_head, seg_head=seg_head, depth_head=depth_head)
    began = time.perf_counter()
    progress(f"reading {video}: {context} context + up to {horizon} future frames, {stride:g} s apart, from "
             f"{start:g} s after the first frame")
    clip = load_clip(video, start=start, stride=stride, count=context + horizon, min_count=context)
    progress(f"  frames at {', '.join(f'{t:.3f}' for t in clip.video_times)} s (video: {clip.num_video_frames} "
             f"frames, {clip.duration:.2f} s, {clip.fps:.3g} fps, first frame stamped {clip.first_stamp:.2f} s)")
    if clip.uneven > 1e-3:
        message = (f"--stride {stride:g} s is not a whole number of frames at {clip.fps:.3g} fps: using the nearest "
                   f"frames, at {', '.join(f'{t:.3f}' for t in clip.video_times)} s (wanted "
                   f"{', '.join(f'{t:.3f}' for t in clip.wanted[:len(clip.video_times)])}); the model sees the "
                   "times used")
        logging.warning(message)
        progress("warning: " + message)
    num_truth = len(clip.frames) - context
    if num_truth < horizon:
        progress(f"  the video ends {num_truth} frame(s) after the context: steps past it have no truth to score")
    if models is None:
        progress("loading models")
        models = load_models(vfm, tokenizer, world, patch_size=patch_size, position_channels=position_channels,
                             world_num_heads=world_num_heads, world_rope_axis_sizes=world_rope_axis_sizes,
                             world_rope_unrotated_size=world_rope_unrotated_size, rgb_head=rgb_head,
                             rgb_head_num_heads=rgb_head_num_heads, seg_head=seg_head, seg_head_kind=seg_head_kind,
                             depth_head=depth_head)
    patch = patch_size_of(models)
    if size % patch:
        raise ForecastInputError(f"--size {size} is not a multiple of the VFM patch size {patch}")
    views, layout = crop_views(clip.frames, size, crop, patch)
    progress(f"forecasting {num_samples} futures of {horizon} frames: crop {crop}, {len(views)} view(s) of "
             f"{views.shape[2]}x{views.shape[3]} px")
    out_all = forecast_views(models, views, clip.times, context=context, horizon=horizon, stride=stride,
                             num_samples=num_samples, seed=seed)
    scores = score(out_all)
    per_view = []
    for v in range(len(views)):
        best = None
        if scores is not None and num_samples > 1:
            best = int(scores["best_sample"][v])
        per_view.append({"rollouts": out_all["rollouts"][v], "context": out_all["context"][v],
                         "truth": out_all["truth"][v], "best": best, "grid_hw": out_all["grid_hw"]})
    drawn = crop_views(clip.frames, size, crop, patch)[0] if crop != "two_squares" else None
    frames_drawn = drawn[0] if drawn is not None else resize_frames(clip.frames, tuple(layout["frame_hw"]))
    progress("drawing")
    frame_times = np.concatenate([clip.times[:context],
                                  clip.times[context - 1] + stride * np.arange(1, horizon + 1)])
    frame_times[context:context + num_truth] = clip.times[context:]
    paths = draw(models, frames_drawn, per_view[0], out, fps=fps, layout=layout, views=per_view,
                 times=frame_times + clip.video_times[0])
    head_paths, agreement = draw_heads(models, per_view, layout, frame_times + clip.video_times[0], out)
    paths.update(head_paths)
    settings = dict(video=video, crop=crop, frame_hw=[int(x) for x in layout["frame_hw"]], num_samples=num_samples,
                    context=context, horizon=horizon, stride=stride, start=start, seed=seed, vfm=vfm,
                    tokenizer=tokenizer, world=world)
    summary = summarise(clip, scores, settings, len(views), agreement)
    paths.update(write_summary(out, "summary", summary, summary_markdown(summary)))
    if summary["scores"]:
        sc = summary["scores"]
        progress(f"error on the last known step: best {sc['best'][-1]:.4f}, mean {sc['mean_of_samples'][-1]:.4f}, "
                 f"copy-last {sc['copy_last'][-1]:.4f}")
    progress(f"done in {time.perf_counter() - began:.1f} s: {out}")
    return paths


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    common = dict(vfm=_VFM.value, tokenizer=_TOKENIZER.value, world=_WORLD.value, num_samples=_NUM_SAMPLES.value,
                  context=_CONTEXT.value, stride=_STRIDE.value, start=_START.value, size=_SIZE.value, crop=_CROP.value,
                  patch_size=_PATCH.value, position_channels=_POSITION.value, world_num_heads=_WORLD_HEADS.value,
                  world_rope_axis_sizes=_WORLD_ROPE.value, world_rope_unrotated_size=_WORLD_UNROTATED.value,
                  seed=_SEED.value, out=_OUT.value)
    try:
        if _VIDEOS.value and not _VIDEO.value:
            horizons = tuple(h for h in (1, 3) if h <= _HORIZON.value) or (_HORIZON.value,)
            paths = forecast_folder.run_folder(videos=_VIDEOS.value, horizons=horizons, batch_size=_BATCH.value,
                                               max_videos=_MAX_VIDEOS.value, pictures=_PICTURES.value, **common)
        else:
            paths = run(video=_VIDEO.value, horizon=_HORIZON.value, rgb_head=_RGB_HEAD.value,
                        rgb_head_num_heads=_RGB_HEADS.value, seg_head=_SEG_HEAD.value, seg_head_kind=_SEG_KIND.value,
                        depth_head=_DEPTH_HEAD.value, fps=_FPS.value, **common)
    except ForecastInputError as e:
        # A plain message, not absl's usage text: the problem is in the input, not in how the flags are spelt.
        print(f"forecast: error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
