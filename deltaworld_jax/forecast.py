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
--tokenizer / --world, one of OUR training runs (its workdir or checkpoints folder). Sizes the weights do
not carry (DeltaWorld's heads and RoPE split, the RGB head's heads) come from the flag, else from the
repository's config.json, else the released values.

Writes to --out: forecast.png (rows named: frames, best, mean, samples; the context columns marked),
forecast.gif and forecast.mp4 (context, then each future step, all samples side by side), segmentation.png /
depth.png when heads are given, summary.json and summary.md (frame times used, per-sample error against
the true future, best sample, mean of the samples and copy-last).

`--videos=DIR` forecasts and scores every video of a folder instead (forecast_folder.py): the official
protocol (fixed stride, 4 context frames, horizons 1 and 3), best / mean / copy-last per horizon.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags, logging
from PIL import Image

CROPS = ("full", "two_squares", "center")
# Chosen by measurement on real footage (benchmarks/footage.md): see the report of issue 17.
DEFAULT_CROP = "full"
# Released values of the sizes the DeltaWorld / RGB-head weights do not carry.
RELEASED_WORLD_HEADS, RELEASED_WORLD_ROPE, RELEASED_WORLD_UNROTATED = 12, (60,), 4
RELEASED_RGB_HEADS = 16
HEADER_HEIGHT = 28  # pixels of column titles above the pictures' grids

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


class ForecastInputError(ValueError):
    """The video or weights given to the forecast command cannot be used (the message says why)."""


def progress(message: str) -> None:
    """One progress line on stdout (the command's own voice; absl's log goes to stderr)."""
    print(f"[forecast] {message}", flush=True)


# ----------------------------------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Clip:
    """Frames read at a stride. times: s from the first PICKED frame (what the model sees); video_times: s
    from the video's first frame; wanted: the times asked for (s from the video's first frame)."""

    frames: np.ndarray
    times: np.ndarray
    video_times: np.ndarray
    wanted: np.ndarray
    first_stamp: float
    num_video_frames: int
    duration: float
    fps: float

    @property
    def uneven(self) -> float:
        """Largest distance (s) between a wanted and a used time."""
        n = len(self.video_times)
        return float(np.max(np.abs(self.video_times - self.wanted[:n]))) if n else 0.0


def load_clip(path: str, *, start: float, stride: float, count: int, min_count: int) -> Clip:
    """Up to `count` frames nearest to start + i * stride seconds after the video's first frame; fewer than
    `min_count` (or two wanted times landing on one frame) is an error that says what the video holds."""
    from deltaworld_jax.data import video

    if not os.path.isfile(path):
        raise ForecastInputError(f"video not found: {path}")
    try:
        index = video.index_frames(path)
    except video.DECODE_ERRORS as e:
        raise ForecastInputError(f"cannot read video {path}: {type(e).__name__}: {e}") from None
    times = index.times
    fps = (len(times) - 1) / times[-1] if len(times) > 1 and times[-1] > 0 else 0.0
    picked = video.pick_frames(times, start, stride, count)
    if len(picked.positions) < min_count or len(set(picked.positions)) < len(picked.positions):
        raise ForecastInputError(
            f"{path} is too short for this clip: {min_count} distinct frames {stride:g} s apart from {start:g} s "
            f"(counted from the first frame) are needed; the video has {len(times)} frames over "
            f"{times[-1]:.2f} s at {fps:.3g} fps (its first frame is stamped {index.start_time:.2f} s). "
            f"Try a smaller --start or --stride.")
    try:
        frames = np.stack(video.read_frames(path, index, picked.positions, threads=0))
    except video.DECODE_ERRORS as e:
        raise ForecastInputError(f"cannot read video {path}: {type(e).__name__}: {e}") from None
    used = picked.times
    return Clip(frames, (used - used[0]).astype(np.float32), used, picked.wanted, index.start_time, len(times),
                float(times[-1]), fps)


def read_clip(path: str, *, start: float, stride: float, count: int, min_count: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB frames [k, H, W, 3], their times in s from the first of them): see load_clip."""
    clip = load_clip(path, start=start, stride=stride, count=count, min_count=min_count)
    return clip.frames, clip.times


def _resize(frames: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(f).resize((hw[1], hw[0]), Image.BILINEAR)) for f in frames])


def square_resize(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to `size` (bilinear) and centre-crop a size x size square."""
    h, w = frames.shape[1:3]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    return _resize(frames, (nh, nw))[:, top:top + size, left:left + size]


def full_resize(frames: np.ndarray, size: int, patch: int) -> np.ndarray:
    """The whole frame, short side `size`, long side the nearest whole number of patches (the aspect ratio
    changes by under half a patch)."""
    h, w = frames.shape[1:3]
    scale = size / min(h, w)
    nh, nw = (max(patch, round(h * scale / patch) * patch), max(patch, round(w * scale / patch) * patch))
    nh, nw = (size, nw) if h <= w else (nh, size)
    return _resize(frames, (nh, nw))


def crop_views(frames: np.ndarray, size: int, crop: str, patch: int) -> tuple[np.ndarray, dict]:
    """Frames [T, H, W, 3] -> views [V, T, h, w, 3] the model sees, and how to put pictures back together
    ({'crop', 'frame_hw': resized frame size, 'offsets': each view's (top, left) in it})."""
    if crop == "center":
        return square_resize(frames, size)[None], {"crop": crop, "frame_hw": (size, size), "offsets": [(0, 0)]}
    if crop == "full":
        full = full_resize(frames, size, patch)
        return full[None], {"crop": crop, "frame_hw": full.shape[1:3], "offsets": [(0, 0)]}
    if crop != "two_squares":
        raise ForecastInputError(f"--crop={crop!r}: expected one of {', '.join(CROPS)}")
    h, w = frames.shape[1:3]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    resized = _resize(frames, (nh, nw))
    if nh == nw:
        return resized[None], {"crop": crop, "frame_hw": (nh, nw), "offsets": [(0, 0)]}
    # The official split (evaluation.split_into_square_crops): squares at the two ends, overlapping.
    from deltaworld_jax.training.evaluation import split_into_square_crops

    views, _, _, _ = split_into_square_crops(resized[None], None)
    offsets = [(0, 0), (0, nw - size)] if nw > nh else [(0, 0), (nh - size, 0)]
    return views, {"crop": crop, "frame_hw": (nh, nw), "offsets": offsets}


def stitch(images: list[np.ndarray], layout: dict) -> np.ndarray:
    """Per-view images (float [h, w, 3], any common scale) -> one image of the resized frame: each view at
    its offset, the second of two overlapping squares from the frame's midpoint on (as the official
    evaluation splits labels); uncovered pixels (aspect >= 2) grey."""
    if len(images) == 1:
        return images[0]
    fh, fw = layout["frame_hw"]
    vh, vw = images[0].shape[:2]
    scale = vh / min(fh, fw)
    ch, cw = round(fh * scale), round(fw * scale)
    canvas = np.full((ch, cw, images[0].shape[-1]), 0.5, np.float32)
    (t0, l0), (t1, l1) = [(round(t * scale), round(left * scale)) for t, left in layout["offsets"]]
    canvas[t0:t0 + vh, l0:l0 + vw] = images[0]
    if cw > ch:
        mid = cw // 2
        start = max(mid, l1)
        canvas[:, start:l1 + vw] = images[1][:, start - l1:]
    else:
        mid = ch // 2
        start = max(mid, t1)
        canvas[start:t1 + vh] = images[1][start - t1:]
    return canvas


# ----------------------------------------------------------------------------------------------------
# Weights: files, folders, hub ids, our training runs
# ----------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
_PREFERRED = ("pytorch_model.bin", "model.safetensors", "model.pth", "model.pt")


def is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not source.lower().endswith(_WEIGHT_SUFFIXES) and not os.path.exists(source)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download(repo_id: str, flag: str) -> str:
    """The local snapshot folder of hub repo `repo_id` (config.json and weights), or a clear error."""
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise ForecastInputError(f"--{flag}={repo_id}: a hub id needs huggingface_hub (pip install huggingface_hub)"
                                 ) from None
    offline = _hub_offline()
    try:
        return huggingface_hub.snapshot_download(repo_id, local_files_only=offline,
                                                 allow_patterns=["config.json", *(f"*{s}" for s in _WEIGHT_SUFFIXES)])
    except Exception as e:  # HTTP, connection, validation and cache errors all end here
        if offline or isinstance(e, hub_errors.LocalEntryNotFoundError):
            why = ("the Hugging Face Hub is unreachable (offline: HF_HUB_OFFLINE is set)" if offline else
                   "the Hugging Face Hub could not be reached (no network?)")
            hint = "and it is not in the local cache. Download it where there is network, or pass a local file"
        elif isinstance(e, hub_errors.GatedRepoError):
            why, hint = "the repository is gated", "accept its licence and log in (HF_TOKEN), or pass a local file"
        elif isinstance(e, (hub_errors.RepositoryNotFoundError, hub_errors.HFValidationError)):
            why, hint = "no such repository (or no access to it)", "check the id, or pass a local file"
        else:
            why, hint = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "or pass a local file"
        raise ForecastInputError(f"--{flag}: cannot load {repo_id!r} (not a local path, so tried as a hub id): "
                                 f"{why}; {hint} or folder.") from None


def _weights_in(folder: str, flag: str) -> str:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(_WEIGHT_SUFFIXES))
    for name in _PREFERRED:
        if name in names:
            return os.path.join(folder, name)
    if not names:
        raise ForecastInputError(f"--{flag}: {folder} holds no weights file ({', '.join(_WEIGHT_SUFFIXES)}); "
                                 f"it has {sorted(os.listdir(folder))[:10]}")
    return os.path.join(folder, names[0])


def _is_training_run(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints")) or any(
        n.isdigit() for n in (os.listdir(path) if os.path.isdir(path) else []))


def check_source(source: str | None, flag: str) -> None:
    """Cheap check before anything is read: present, and a local path or a hub id."""
    if not source:
        raise ForecastInputError(f"--{flag} is required")
    if source == "pixel" or os.path.exists(source) or is_hub_id(source):
        return
    raise ForecastInputError(f"--{flag}: weights not found at {source} (neither a file, a folder nor a hub id "
                             "owner/name)")


def resolve_weights(source: str, flag: str) -> tuple[str, dict | None]:
    """(a local weights file, or our training run's folder; the repo's config.json as a dict or None)."""
    check_source(source, flag)
    folder = download(source, flag) if is_hub_id(source) else source
    if os.path.isdir(folder):
        config = None
        if os.path.isfile(os.path.join(folder, "config.json")):
            with open(os.path.join(folder, "config.json")) as f:
                config = json.load(f)
        if _is_training_run(folder) and flag in ("tokenizer", "world"):
            return folder, config
        return _weights_in(folder, flag), config
    sibling = os.path.join(os.path.dirname(os.path.abspath(folder)), "config.json")
    if os.path.isfile(sibling):
        with open(sibling) as f:
            return folder, json.load(f)
    return folder, None


def _config_value(config: dict | None, *names: str):
    """The first of `names` in config.json (top level, or under 'predictor' / 'model' / 'network')."""
    if not config:
        return None
    for scope in (config, config.get("predictor"), config.get("model"), config.get("network")):
        if isinstance(scope, dict):
            for name in names:
                if name in scope:
                    return scope[name]
    return None


def world_sizes(config: dict | None, num_heads=None, rope_axis_sizes=None, rope_unrotated_size=None) -> dict:
    """DeltaWorld's heads and RoPE split: the flag, else the repo's config.json, else the released values;
    each with where it came from."""
    out = {}
    for key, given, names, released in (
            ("num_heads", num_heads, ("num_heads", "num_attention_heads"), RELEASED_WORLD_HEADS),
            ("rope_axis_sizes", rope_axis_sizes, ("rope_axis_sizes",), RELEASED_WORLD_ROPE),
            ("rope_unrotated_size", rope_unrotated_size, ("rope_unrotated_size",), RELEASED_WORLD_UNROTATED)):
        from_config = _config_value(config, *names)
        if given is not None:
            value, where = given, "--world_" + key
        elif from_config is not None:
            value, where = from_config, "config.json"
        else:
            value, where = released, "the released value"
        if key == "rope_axis_sizes":
            value = tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        else:
            value = int(value)
        out[key] = (value, where)
    return out


def read_training_checkpoint(directory: str, kind: str) -> dict[str, np.ndarray] | None:
    """Our own training run's weights under the OFFICIAL names, or None if `directory` holds no Orbax
    checkpoint. `directory` is a run's workdir (with checkpoints/) or its checkpoints folder; the latest
    step's `params` item is read and renamed (Linear kernels transposed back to torch weights), so the
    official loaders (which infer every size from the tensors) build the model: no config needed. A run of
    the other model (a DeltaTok run given as --world, or the reverse) is refused by name."""
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
    is_world = any(p[:2] == ("predictor", "blocks") for p in flat)
    if kind == "world":
        if not is_world:
            what = ("a DeltaTok (tokenizer) checkpoint: pass it as --tokenizer"
                    if any(p[0] in ("encoder", "decoder", "z_embed") for p in flat)
                    else f"no DeltaWorld predictor among its entries {sorted('.'.join(p) for p in flat)[:5]}")
            raise ForecastInputError(f"--world={directory}: not a DeltaWorld checkpoint; step {step} holds {what}")
        from deltaworld_jax.pretrained.world import world_key_map

        num_layers = 1 + max(int(p[2]) for p in flat if p[:2] == ("predictor", "blocks"))
        with_q_embed = ("q_embed",) in flat
        ours = {tuple(str(x) for x in path): (name, transpose)
                for name, (path, transpose) in world_key_map(num_layers, with_q_embed).items()}
        missing = sorted(".".join(p) for p in flat if p not in ours)
        if missing:
            raise ForecastInputError(f"--world={directory}: not a DeltaWorld checkpoint (unknown entries {missing[:5]})")
        return {ours[p][0]: (a.T if ours[p][1] else a) for p, a in flat.items()}
    if is_world:
        raise ForecastInputError(f"--tokenizer={directory}: not a DeltaTok checkpoint; step {step} holds a DeltaWorld "
                                 "(predictor) checkpoint: pass it as --world")
    # DeltaTok: the official names are our paths, with Linear kernels as transposed weights.
    return {".".join(p[:-1] + ("weight",)) if p[-1] == "kernel" else ".".join(p): (a.T if p[-1] == "kernel" else a)
            for p, a in flat.items()}


def _need(path: str | None, flag: str) -> str:
    check_source(path, flag)
    return path


def load_models(vfm: str, tokenizer: str, world: str, *, patch_size: int = 16, position_channels: int = 0,
                world_num_heads: int | None = None, world_rope_axis_sizes=None, world_rope_unrotated_size=None,
                rgb_head: str | None = None, rgb_head_num_heads: int | None = None, seg_head: str | None = None,
                seg_head_kind: str = "vspw", depth_head: str | None = None) -> dict[str, Any]:
    """{'vfm', 'tokenizer', 'world', 'rgb_head', 'seg_head', 'depth_head' (the last three may be None)} from
    the weights' paths or hub ids. Errors (a wrong file, sizes that do not fit) are ForecastInputError."""
    from deltaworld_jax.models.dinov3 import PixelPatchVFM
    from deltaworld_jax.pretrained import load_deltaworld, load_dinov3, load_head
    from deltaworld_jax.pretrained.deltatok import load_deltatok
    from deltaworld_jax.pretrained.dinov3 import HubDownloadError

    if _need(vfm, "vfm") == "pixel":
        vfm_model = PixelPatchVFM(patch_size=patch_size, num_position_channels=position_channels)
    else:
        try:
            vfm_model = load_dinov3(vfm)
        except HubDownloadError as e:
            raise ForecastInputError(f"--vfm: {e}") from None
    tok_path, _ = resolve_weights(_need(tokenizer, "tokenizer"), "tokenizer")
    tok_source = (read_training_checkpoint(tok_path, "tokenizer") if os.path.isdir(tok_path) else None) or tok_path
    try:
        tok = load_deltatok(tok_source, vfm=vfm_model)
    except (ValueError, KeyError) as e:
        raise ForecastInputError(f"--tokenizer={tokenizer}: {e}") from None
    world_path, world_config = resolve_weights(_need(world, "world"), "world")
    world_source = (read_training_checkpoint(world_path, "world") if os.path.isdir(world_path) else None) or world_path
    sizes = world_sizes(world_config, world_num_heads,
                        None if world_rope_axis_sizes is None else tuple(int(s) for s in world_rope_axis_sizes),
                        world_rope_unrotated_size)
    try:
        world_model = load_deltaworld(world_source, tokenizer=tok, num_heads=sizes["num_heads"][0],
                                      rope_axis_sizes=sizes["rope_axis_sizes"][0],
                                      rope_unrotated_size=sizes["rope_unrotated_size"][0])
    except (ValueError, KeyError, AssertionError) as e:
        said = ", ".join(f"{k} {v} (from {w})" for k, (v, w) in sizes.items())
        raise ForecastInputError(f"--world={world}: {e}. Sizes used: {said}") from None
    heads: dict[str, Any] = {"rgb_head": None, "seg_head": None, "depth_head": None}
    if rgb_head:
        if not hasattr(vfm_model, "norm"):
            raise ForecastInputError("--rgb_head decodes DINOv3 features; the pixel VFM needs no RGB head")
        path, config = resolve_weights(_need(rgb_head, "rgb_head"), "rgb_head")
        num_heads = rgb_head_num_heads or _config_value(config, "num_heads", "decoder_num_heads") or RELEASED_RGB_HEADS
        try:
            heads["rgb_head"] = load_head(path, "rgb-head-imagenet", norm_weight=np.asarray(vfm_model.norm.weight[...]),
                                          norm_bias=np.asarray(vfm_model.norm.bias[...]), num_heads=int(num_heads))
        except (ValueError, KeyError) as e:
            raise ForecastInputError(f"--rgb_head={rgb_head}: {e} (decoder heads {num_heads})") from None
    for flag, source, kind in (("seg_head", seg_head, f"seg-head-{seg_head_kind}"),
                               ("depth_head", depth_head, "depth-head-kitti")):
        if source:
            path, _ = resolve_weights(source, flag)
            try:
                heads[flag] = load_head(path, kind)
            except (ValueError, KeyError) as e:
                raise ForecastInputError(f"--{flag}={source}: {e}") from None
            if heads[flag].in_features != vfm_model.hidden_size:
                raise ForecastInputError(f"--{flag}: the head reads {heads[flag].in_features}-wide features, "
                                         f"the VFM makes {vfm_model.hidden_size}")
    return {"vfm": vfm_model, "tokenizer": tok, "world": world_model, **heads}


# ----------------------------------------------------------------------------------------------------
# Forecast and scores
# ----------------------------------------------------------------------------------------------------


def forecast_views(models: dict[str, Any], views: np.ndarray, timestamps: np.ndarray, *, context: int,
                   horizon: int, stride: float, num_samples: int, seed: int = 0) -> dict[str, Any]:
    """Sample futures of V views [V, T, H, W, 3] of one clip (T = context + the k <= horizon true future
    frames): {'rollouts' [V, S, horizon, N, D], 'context' [V, c, N, D], 'truth' [V, k, N, D], 'grid_hw'}."""
    import jax
    import jax.numpy as jnp

    from deltaworld_jax.training.evaluation import vfm_features
    from deltaworld_jax.training.forecasters import jit_deltaworld_rollout

    vfm = models["vfm"]
    grid_hw = tuple(vfm.grid_hw(views.shape[1:]))
    num_views = views.shape[0]
    feats = vfm_features(vfm, jnp.asarray(views))  # [V, T, N, D]
    black = vfm_features(vfm, jnp.zeros((1, *views.shape[2:]), jnp.uint8))
    known_future = views.shape[1] - context
    # The rollout takes the future frames only as targets: pad unknown ones, and extend the timestamps.
    future_feats = jnp.concatenate([feats[:, context:], jnp.zeros_like(feats[:, :horizon - known_future])], 1)
    clip_feats = jnp.concatenate([feats[:, :context], future_feats], 1)
    times = np.concatenate([timestamps[:context], timestamps[context - 1] + stride * np.arange(1, horizon + 1)])
    times[context:context + known_future] = timestamps[context:]
    times = np.broadcast_to(times[None], (num_views, len(times)))
    rollouts, _ = jit_deltaworld_rollout(models["world"], models["tokenizer"], clip_feats,
                                         jnp.asarray(times, jnp.float32), black, jax.random.key(seed),
                                         ctx_len=context, grid_hw=grid_hw, num_samples=num_samples)
    return {"rollouts": np.asarray(rollouts), "context": np.asarray(feats[:, :context]),
            "truth": np.asarray(feats[:, context:]), "grid_hw": grid_hw, "times": times[0]}


def forecast_features(models: dict[str, Any], frames: np.ndarray, timestamps: np.ndarray, *, context: int,
                      horizon: int, stride: float, num_samples: int, seed: int = 0) -> dict[str, Any]:
    """Sample futures of one clip [T, H, W, 3] (any H x W of whole patches): {'rollouts' [S, horizon, N, D],
    'context' [c, N, D], 'truth' [k, N, D] (k <= horizon true future frames read from the video), 'best'
    index or None, 'grid_hw'}."""
    out = forecast_views(models, frames[None], timestamps, context=context, horizon=horizon, stride=stride,
                         num_samples=num_samples, seed=seed)
    scores = score(out)
    best = scores["best_sample"][0] if scores and out["truth"].shape[1] == horizon and num_samples > 1 else None
    return {"rollouts": out["rollouts"][0], "context": out["context"][0], "truth": out["truth"][0],
            "best": None if best is None else int(best), "grid_hw": out["grid_hw"]}


def _criterion(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """smooth-L1 (beta 0.1, the DeltaWorld criterion) averaged over patches and channels."""
    d = np.abs(np.asarray(pred, np.float64) - np.asarray(target, np.float64))
    return np.where(d < 0.1, 0.5 * d * d / 0.1, d - 0.05).mean(axis=(-2, -1))


def score(out: dict[str, Any]) -> dict[str, Any] | None:
    """Errors against the true future frames (None when the video has none after the context), per view:
    'per_sample' [V, S, k], 'mean' [V, k] (mean of the samples' features), 'copy_last' [V, k], 'best'
    [V, k] and 'best_sample' [V] (the sample with the lowest error on the last known future frame)."""
    truth = out["truth"]
    k = truth.shape[1]
    if k == 0:
        return None
    rollouts = out["rollouts"][:, :, :k]
    per_sample = _criterion(rollouts, truth[:, None])  # [V, S, k]
    best_sample = np.argmin(per_sample[:, :, -1], axis=1)
    return {"per_sample": per_sample, "best_sample": best_sample,
            "best": per_sample[np.arange(len(best_sample)), best_sample],
            "mean": _criterion(rollouts.mean(1), truth),
            "copy_last": _criterion(np.broadcast_to(out["context"][:, -1:], truth.shape), truth)}


def _head_maps(head, feats: np.ndarray, grid_hw) -> np.ndarray:
    from deltaworld_jax.training import pictures

    f = np.asarray(feats, np.float32)
    return np.asarray(pictures.apply_head(head, f.reshape(-1, *grid_hw, f.shape[-1])))


# ----------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------


def decode_features(models: dict[str, Any], result: dict[str, Any], fit_on: np.ndarray | None = None):
    """A function features [k, N, D] -> list of float images [H, W, 3] in [0, 1], and its name. A feature
    PCA is fit on `fit_on` (default: the result's context and truth)."""
    from deltaworld_jax.models.dinov3 import PixelPatchVFM
    from deltaworld_jax.training import pictures

    vfm, grid_hw = models["vfm"], result["grid_hw"]
    if models.get("rgb_head") is not None:
        head = models["rgb_head"]

        def rgb(f):
            f = np.asarray(f, np.float32)
            return [pictures.rgb_image(x) for x in np.asarray(pictures.apply_head(head, f.reshape(-1, *grid_hw, f.shape[-1])))]

        return rgb, "rgb"
    if isinstance(vfm, PixelPatchVFM):
        return lambda f: [pictures.frame_image(x) for x in np.asarray(vfm.patches_to_frames(np.asarray(f), grid_hw))], \
            "pixels"
    if fit_on is None:
        fit_on = np.concatenate([result["context"], result["truth"]])

    def pca(f):
        return pictures.feature_pca(fit_on, np.asarray(f), grid_hw=grid_hw)[1]

    return pca, "pca"


def labelled_grid(rows: list[list[np.ndarray | None]], row_names: list[str], column_names: list[str],
                  context: int, max_cell: int = 256) -> np.ndarray:
    """uint8 grid with a name strip on the left, column titles on top, and the context columns marked
    (a blue bar over them; the futures' columns get an orange one)."""
    from PIL import ImageDraw

    from deltaworld_jax.training import pictures

    body = pictures.grid_image(rows, len(column_names), max_cell=max_cell)
    cell_h, cell_w = body.shape[0] // len(rows), body.shape[1] // len(column_names)
    strip_w = max(8 * max(len(n) for n in row_names) + 6, 40)
    header_h = HEADER_HEIGHT
    canvas = Image.new("RGB", (strip_w + body.shape[1], header_h + body.shape[0]), (24, 24, 24))
    canvas.paste(Image.fromarray(body), (strip_w, header_h))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(column_names):
        x = strip_w + c * cell_w
        colour = (60, 120, 230) if c < context else (235, 140, 40)
        draw.rectangle([x + 1, header_h - 6, x + cell_w - 2, header_h - 2], fill=colour)
        draw.text((x + 3, 3), name, fill=(255, 255, 255))
    for r, name in enumerate(row_names):
        draw.text((3, header_h + r * cell_h + 3), name, fill=(255, 255, 255))
    return np.asarray(canvas)


def _column_names(times: np.ndarray, context: int, num_truth: int, horizon: int) -> list[str]:
    names = [f"context {t:.2f}s" for t in times[:context]]
    for k in range(horizon):
        names.append(f"+{k + 1} {times[context + k]:.2f}s" + ("" if k < num_truth else " (no frame)"))
    return names


def draw(models: dict[str, Any], frames: np.ndarray, result: dict[str, Any], out_dir: str, fps: float = 4.0,
         layout: dict | None = None, views: list[dict] | None = None, times: np.ndarray | None = None) -> dict[str, str]:
    """Write forecast.png (grid), forecast.gif and forecast.mp4; returns their paths. `frames` are the frames
    as drawn; `views` the per-view results of a split frame (stitched back with `layout`)."""
    from deltaworld_jax.training import pictures

    views = views or [result]
    layout = layout or {"frame_hw": frames.shape[1:3], "offsets": [(0, 0)]}
    context = views[0]["context"].shape[0]
    horizon = views[0]["rollouts"].shape[1]
    best = [v.get("best") for v in views]

    fit_on = np.concatenate([np.concatenate([v["context"], v["truth"]]) for v in views])  # one PCA for all views

    def decoded(select) -> list[np.ndarray]:
        per_view = []
        for v in views:
            decode, _ = decode_features(models, v, fit_on)
            per_view.append(decode(select(v)))
        return [stitch([pv[k] for pv in per_view], layout) for k in range(len(per_view[0]))]

    futures = {}
    if all(b is not None for b in best):
        futures["best"] = decoded(lambda v: v["rollouts"][v["best"]])
    futures["mean"] = decoded(lambda v: v["rollouts"].mean(0))
    for i in range(views[0]["rollouts"].shape[0]):
        futures[f"sample {i}"] = decoded(lambda v, i=i: v["rollouts"][i])
    how = decode_features(models, views[0])[1]
    frame_imgs = [pictures.frame_image(f) for f in frames]
    num_truth = len(frame_imgs) - context
    times = np.asarray(times if times is not None else np.arange(context + horizon), np.float64)
    rows = [frame_imgs + [None] * (horizon - num_truth)]
    row_names = ["frames" if num_truth else "frames (no future)"]
    for name, images in futures.items():
        rows.append([None] * context + list(images))
        row_names.append(f"{name} ({how})")
    grid = labelled_grid(rows, row_names, _column_names(times, context, num_truth, horizon), context)
    paths = {"grid": pictures.write_png(grid, os.path.join(out_dir, "forecast.png"))}
    # Animation: the context (the same in every panel), then each step with every sample side by side.
    panels = ["frames"] + list(futures)
    steps = []
    for t in range(context + horizon):
        if t < context:
            row = [frame_imgs[t]] * len(panels)
        else:
            k = t - context
            row = [frame_imgs[t] if t < len(frame_imgs) else None] + [futures[name][k] for name in futures]
        title = f"context {t + 1}/{context}" if t < context else f"future +{t - context + 1}"
        steps.append(labelled_grid([row], [title], panels, context=len(panels) if t < context else 1))
    paths["gif"] = pictures.write_animation(steps, os.path.join(out_dir, "forecast.gif"), fps=fps)
    paths["mp4"] = pictures.write_animation(steps, os.path.join(out_dir, "forecast.mp4"), fps=fps)
    logging.info("futures drawn as %s: %s", how, paths)
    return paths


def draw_heads(models: dict[str, Any], views: list[dict], layout: dict, frames_times: np.ndarray, out_dir: str,
               ) -> tuple[dict[str, str], dict[str, Any]]:
    """segmentation.png / depth.png of the context, the truth and the futures (when heads are given), and
    how well the best / mean future's maps agree with the truth's (pixel agreement %, depth RMSE m)."""
    from deltaworld_jax.training import pictures

    paths, agreement = {}, {}
    context = views[0]["context"].shape[0]
    horizon = views[0]["rollouts"].shape[1]
    num_truth = views[0]["truth"].shape[0]
    for name in ("seg_head", "depth_head"):
        head = models.get(name)
        if head is None:
            continue
        grid_hw = views[0]["grid_hw"]
        rows_src = {"frames": lambda v: np.concatenate([v["context"], v["truth"]]),
                    "mean": lambda v: v["rollouts"].mean(0)}
        if all(v.get("best") is not None for v in views):
            rows_src = {"frames": rows_src["frames"], "best": lambda v: v["rollouts"][v["best"]],
                        "mean": rows_src["mean"]}
        maps = {row: [_head_maps(head, fn(v), grid_hw) for v in views] for row, fn in rows_src.items()}
        if name == "seg_head":
            maps = {row: [m.argmax(-1) for m in ms] for row, ms in maps.items()}
        else:
            maps = {row: [m[..., 0] if m.ndim == 4 else m for m in ms] for row, ms in maps.items()}
        if num_truth:
            for row in maps:
                if row == "frames":
                    continue
                truth = [m[context:] for m in maps["frames"]]
                pred = [m[:num_truth] for m in maps[row]]
                if name == "seg_head":
                    agreement.setdefault("segmentation_agreement_percent", {})[row] = float(np.mean(
                        [100.0 * (p == t).mean() for p, t in zip(pred, truth)]))
                else:
                    agreement.setdefault("depth_rmse_to_truth_features_m", {})[row] = float(np.sqrt(np.mean(
                        [((p - t) ** 2).mean() for p, t in zip(pred, truth)])))

        patch = _patch(models)

        def to_images(per_view):
            """Per-view maps [k, gh, gw] -> one frame-sized map per step (patches as blocks)."""
            up = [np.asarray(m, np.float32).repeat(patch, 1).repeat(patch, 2)[..., None] for m in per_view]
            return [stitch([u[k] for u in up], layout)[..., 0] for k in range(len(up[0]))]

        images = {row: to_images(ms) for row, ms in maps.items()}
        if name == "seg_head":
            images = {row: [pictures.colour_segmentation(m.round().astype(np.int64)) for m in ims]
                      for row, ims in images.items()}
        else:
            rows_list = list(images)
            images = dict(zip(rows_list, pictures.colour_depths(*[images[r] for r in rows_list])))
        rows = [list(images["frames"]) + [None] * (horizon - num_truth)]
        row_names = ["frames"]
        for row in images:
            if row != "frames":
                rows.append([None] * context + list(images[row]))
                row_names.append(row)
        grid = labelled_grid(rows, row_names, _column_names(frames_times, context, num_truth, horizon), context)
        file = "segmentation.png" if name == "seg_head" else "depth.png"
        paths[file.split(".")[0]] = pictures.write_png(grid, os.path.join(out_dir, file))
    return paths, agreement


def _patch(models) -> int:
    return int(models["vfm"].patch_size)


# ----------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------


def summarise(clip: Clip, scores: dict | None, settings: dict, num_views: int, heads: dict) -> dict:
    """summary.json content: settings, frame times, and the scores averaged over the views of the frame."""
    out = {"settings": settings,
           "video": {"frames": clip.num_video_frames, "duration_s": round(clip.duration, 4),
                     "fps": round(clip.fps, 4), "first_frame_stamp_s": round(clip.first_stamp, 4)},
           "frame_times_s": [round(float(t), 4) for t in clip.video_times],
           "wanted_times_s": [round(float(t), 4) for t in clip.wanted],
           "uneven_stride_s": round(clip.uneven, 4), "views": num_views, **heads}
    if scores is None:
        out["scores"] = None
        out["note"] = "the video ends with the context: no true future frames to score against"
        return out
    per_sample = scores["per_sample"].mean(0)  # [S, k] averaged over views
    out["scores"] = {
        "criterion": "smooth-L1 (beta 0.1) of features to the true future frames' features, per future step",
        "per_sample": [[round(float(x), 6) for x in row] for row in per_sample],
        "best_sample_per_view": [int(b) for b in scores["best_sample"]],
        "best": [round(float(x), 6) for x in scores["best"].mean(0)],
        "mean_of_samples": [round(float(x), 6) for x in scores["mean"].mean(0)],
        "copy_last": [round(float(x), 6) for x in scores["copy_last"].mean(0)],
    }
    return out


def summary_markdown(summary: dict) -> str:
    s = summary["settings"]
    lines = [f"# Forecast of {s['video']}", "",
             f"crop `{s['crop']}` ({summary['views']} view(s)), frames {s['frame_hw'][0]}x{s['frame_hw'][1]}, "
             f"{s['num_samples']} samples, context {s['context']}, horizon {s['horizon']}, stride {s['stride']} s, "
             f"start {s['start']} s after the first frame.", "",
             f"Video: {summary['video']['frames']} frames over {summary['video']['duration_s']} s "
             f"({summary['video']['fps']} fps), first frame stamped {summary['video']['first_frame_stamp_s']} s.", "",
             "Frame times used (s from the first frame): " + ", ".join(f"{t:.3f}" for t in summary["frame_times_s"])]
    if summary["uneven_stride_s"] > 1e-3:
        lines.append(f"(the stride is not a whole number of frames: used times differ from the wanted ones by up "
                     f"to {summary['uneven_stride_s']:.3f} s)")
    lines.append("")
    sc = summary["scores"]
    if sc is None:
        lines.append(summary["note"])
    else:
        steps = len(sc["best"])
        lines += [f"Error to the true future ({sc['criterion']}; lower is better):", "",
                  "| forecast | " + " | ".join(f"+{k + 1}" for k in range(steps)) + " |",
                  "|---|" + "---|" * steps]
        for name, key in (("best sample", "best"), ("mean of samples", "mean_of_samples"), ("copy last", "copy_last")):
            lines.append(f"| {name} | " + " | ".join(f"{x:.4f}" for x in sc[key]) + " |")
        for i, row in enumerate(sc["per_sample"]):
            lines.append(f"| sample {i} | " + " | ".join(f"{x:.4f}" for x in row) + " |")
        lines.append("")
        lines.append(f"Best sample (per view, chosen on the last known future frame): {sc['best_sample_per_view']}")
    for key in ("segmentation_agreement_percent", "depth_rmse_to_truth_features_m"):
        if key in summary:
            lines.append(f"{key}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary[key].items()))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------


def validate(*, video: str | None = None, videos: str | None = None, vfm: str | None, tokenizer: str | None,
             world: str | None, num_samples: int, context: int, horizon: int, stride: float, start: float,
             size: int, crop: str, patch_size: int, rgb_head=None, seg_head=None, depth_head=None) -> None:
    """Every check that needs no video read and no model loaded."""
    if bool(video) == bool(videos):
        raise ForecastInputError("give exactly one of --video (one file) and --videos (a folder)")
    if context < 1 or horizon < 1 or num_samples < 1:
        raise ForecastInputError(f"--context ({context}), --horizon ({horizon}) and --num_samples ({num_samples}) "
                                 "must be >= 1")
    if not stride > 0 or start < 0:
        raise ForecastInputError(f"--stride ({stride}) must be > 0 and --start ({start}) >= 0")
    if crop not in CROPS:
        raise ForecastInputError(f"--crop={crop!r}: expected one of {', '.join(CROPS)}")
    for source, flag in ((vfm, "vfm"), (tokenizer, "tokenizer"), (world, "world")):
        check_source(source, flag)
    for source, flag in ((rgb_head, "rgb_head"), (seg_head, "seg_head"), (depth_head, "depth_head")):
        if source:
            check_source(source, flag)
    patch = patch_size if vfm == "pixel" else _dinov3_patch(vfm)
    if size < 1 or size % patch:
        raise ForecastInputError(f"--size {size} is not a positive multiple of the VFM patch size {patch}")
    if video and not os.path.isfile(video):
        raise ForecastInputError(f"video not found: {video}")
    if videos and not os.path.isdir(videos):
        raise ForecastInputError(f"--videos: no folder at {videos}")


def _dinov3_patch(vfm: str) -> int:
    """DINOv3's patch size from a local config.json (16 for every released DINOv3 ViT otherwise)."""
    config = os.path.join(vfm, "config.json") if os.path.isdir(vfm) else None
    if config and os.path.isfile(config):
        with open(config) as f:
            return int(json.load(f).get("patch_size", 16))
    return 16


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
    patch = _patch(models)
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
    frames_drawn = drawn[0] if drawn is not None else _resize(clip.frames, tuple(layout["frame_hw"]))
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
    paths["summary_json"] = os.path.join(out, "summary.json")
    with open(paths["summary_json"], "w") as f:
        json.dump(summary, f, indent=2)
    paths["summary_md"] = os.path.join(out, "summary.md")
    with open(paths["summary_md"], "w") as f:
        f.write(summary_markdown(summary))
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
            from deltaworld_jax import forecast_folder

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


if __name__ == "__main__":
    app.run(main)
