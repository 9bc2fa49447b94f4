"""What the forecast command reads: video clips at a stride, crops of wide frames, and weights (files,
folders, hub ids, our training runs), with every check that needs neither the video nor the models.

Time is counted from the video's first frame (data/video.py). The command: __init__.py."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import numpy as np
from PIL import Image

from deltaworld_jax.data.sampling import center_square, short_side_hw, square_crops
CROPS = ("full", "two_squares", "center")
# The official evaluation's split: each view a square, as the released models were trained (512 x 512 crops),
# and the whole frame covered. benchmarks/footage.md: with the only weights at hand offline (demo-size models
# trained on 3 other shots of the test footage) no crop beat copy-last on held-out footage, so the measurement
# could not rank them; benchmarks/footage_crops.py repeats it with the released weights.
DEFAULT_CROP = "two_squares"
# Released values of the sizes the DeltaWorld / RGB-head weights do not carry.
RELEASED_WORLD_HEADS, RELEASED_WORLD_ROPE, RELEASED_WORLD_UNROTATED = 12, (60,), 4
RELEASED_RGB_HEADS = 16


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


def resize_frames(frames: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(f).resize((hw[1], hw[0]), Image.BILINEAR)) for f in frames])


def full_resize(frames: np.ndarray, size: int, patch: int) -> np.ndarray:
    """The whole frame, short side `size`, long side the nearest whole number of patches (the aspect ratio
    changes by under half a patch)."""
    h, w = frames.shape[1:3]
    scale = size / min(h, w)
    nh, nw = (max(patch, round(h * scale / patch) * patch), max(patch, round(w * scale / patch) * patch))
    nh, nw = (size, nw) if h <= w else (nh, size)
    return resize_frames(frames, (nh, nw))


def crop_views(frames: np.ndarray, size: int, crop: str, patch: int) -> tuple[np.ndarray, dict]:
    """Frames [T, H, W, 3] -> views [V, T, h, w, 3] the model sees, and how to put pictures back together
    ({'crop', 'frame_hw': resized frame size, 'offsets': each view's (top, left) in it})."""
    if crop == "center":
        square = np.stack([center_square(f, size) for f in frames])
        return square[None], {"crop": crop, "frame_hw": (size, size), "offsets": [(0, 0)]}
    if crop == "full":
        full = full_resize(frames, size, patch)
        return full[None], {"crop": crop, "frame_hw": full.shape[1:3], "offsets": [(0, 0)]}
    if crop != "two_squares":
        raise ForecastInputError(f"--crop={crop!r}: expected one of {', '.join(CROPS)}")
    nh, nw = short_side_hw(*frames.shape[1:3], size)
    resized = resize_frames(frames, (nh, nw))
    if nh == nw:
        return resized[None], {"crop": crop, "frame_hw": (nh, nw), "offsets": [(0, 0)]}
    # The official split (data.sampling.square_crops): squares at the two ends, overlapping.
    views, _, _, _ = square_crops(resized[None], None)
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
# safetensors first: it loads without torch (`python -m deltaworld_jax.pretrained.convert` writes it next to a
# release's pytorch_model.bin) and without unpickling.
_PREFERRED = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")


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


def world_sizes(config: dict | None, num_heads=None, rope_axis_sizes=None, rope_unrotated_size=None, *,
                config_name: str = "config.json") -> dict:
    """DeltaWorld's heads and RoPE split: the flag, else `config` (the repo's config.json, or the model config
    our run recorded), else the released values; each with where it came from."""
    out = {}
    for key, given, names, released in (
            ("num_heads", num_heads, ("num_heads", "num_attention_heads"), RELEASED_WORLD_HEADS),
            ("rope_axis_sizes", rope_axis_sizes, ("rope_axis_sizes",), RELEASED_WORLD_ROPE),
            ("rope_unrotated_size", rope_unrotated_size, ("rope_unrotated_size",), RELEASED_WORLD_UNROTATED)):
        from_config = _config_value(config, *names)
        if given is not None:
            value, where = given, "--world_" + key
        elif from_config is not None:
            value, where = from_config, config_name
        else:
            value, where = released, "the released value"
        if key == "rope_axis_sizes":
            value = tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        else:
            value = int(value)
        out[key] = (value, where)
    return out


def read_training_run(directory: str, flag: str):
    """Our own training run at `directory` (its workdir or checkpoints folder) as pretrained.runs.read_run
    reads it, or None if it holds no Orbax checkpoint. A run of the other model (a DeltaTok run given as
    --world, or the reverse) is refused by name."""
    from deltaworld_jax.pretrained import runs

    run = runs.read_run(directory)
    if run is None:
        return None
    family = run.family
    if flag == "world" and family not in ("deltaworld", "world"):
        what = {"deltatok": "a DeltaTok (tokenizer) checkpoint: pass it as --tokenizer",
                "dinoworld": "a DINO-World checkpoint (the forecast's world model is DeltaWorld)"}.get(
            family, f"no DeltaWorld predictor among its entries {sorted(run.params)[:5]}")
        raise ForecastInputError(f"--world={directory}: not a DeltaWorld checkpoint; step {run.step} holds {what}")
    if flag == "tokenizer" and family != "deltatok":
        what = ("a DeltaWorld (predictor) checkpoint: pass it as --world" if family in ("deltaworld", "world") else
                f"a {family} checkpoint" if family else f"no DeltaTok entries among {sorted(run.params)[:5]}")
        raise ForecastInputError(f"--tokenizer={directory}: not a DeltaTok checkpoint; step {run.step} holds {what}")
    return run


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
    from deltaworld_jax.pretrained.deltatok import deltatok_from_run, load_deltatok
    from deltaworld_jax.pretrained.runs import MODEL_CONFIG
    from deltaworld_jax.pretrained.world import deltaworld_from_run
    from deltaworld_jax.pretrained.dinov3 import HubDownloadError

    if _need(vfm, "vfm") == "pixel":
        vfm_model = PixelPatchVFM(patch_size=patch_size, num_position_channels=position_channels)
    else:
        try:
            vfm_model = load_dinov3(vfm)
        except HubDownloadError as e:
            raise ForecastInputError(f"--vfm: {e}") from None
    tok_path, _ = resolve_weights(_need(tokenizer, "tokenizer"), "tokenizer")
    tok_run = read_training_run(tok_path, "tokenizer") if os.path.isdir(tok_path) else None

    def load_tokenizer(vfm=None):  # our run, built under its own names; else official weights
        return deltatok_from_run(tok_run, vfm=vfm) if tok_run else load_deltatok(tok_path, vfm=vfm)

    try:
        if isinstance(vfm_model, PixelPatchVFM):
            # The pixel VFM has no heads of its own: the tokenizer's tensors (or our run's record) tell them
            # when they can (our demo-style runs pick any), else the pixel VFM's default.
            try:
                tok = load_tokenizer()
            except ValueError as e:
                if "cannot be read from the tensors" not in str(e):
                    raise
                tok = load_tokenizer(vfm_model)
            if tok.cfg.hidden_size != vfm_model.hidden_size:
                raise ValueError(f"the checkpoint's DeltaTok width {tok.cfg.hidden_size} does not match the pixel "
                                 f"VFM's hidden_size {vfm_model.hidden_size} (--patch_size {patch_size}, "
                                 f"--position_channels {position_channels})")
            vfm_model = PixelPatchVFM(patch_size=patch_size, num_heads=tok.cfg.num_heads,
                                      num_position_channels=position_channels)
        else:
            tok = load_tokenizer(vfm_model)
    except (ValueError, KeyError) as e:
        raise ForecastInputError(f"--tokenizer={tokenizer}: {e}") from None
    world_path, world_config = resolve_weights(_need(world, "world"), "world")
    world_run = read_training_run(world_path, "world") if os.path.isdir(world_path) else None
    if world_run is not None and world_run.record is not None:  # the sizes the run was trained with
        world_config, config_name = world_run.record["config"], f"the run's {MODEL_CONFIG}"
    else:
        config_name = "config.json"
    sizes = world_sizes(world_config, world_num_heads,
                        None if world_rope_axis_sizes is None else tuple(int(s) for s in world_rope_axis_sizes),
                        world_rope_unrotated_size, config_name=config_name)
    try:
        chosen = {key: value for key, (value, _) in sizes.items()}
        world_model = (deltaworld_from_run(world_run, tokenizer=tok, **chosen) if world_run else
                       load_deltaworld(world_path, tokenizer=tok, **chosen))
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
# Checks before anything is read
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

