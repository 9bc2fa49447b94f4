"""Temporal sampling, spatial augmentation and resizing, shared by every source.

Everything random here takes an explicit `np.random.Generator`, and the pipeline derives that generator
from (seed, epoch, record, attempt) only, so a clip never depends on worker count, process layout or
the order in which workers run.

Temporal sampling follows the official `sample_frame_indices`: T-1 strides drawn uniformly from the
stride range (seconds), a start drawn uniformly so the clip fits in the video where it can, then the
frame NEAREST to each target time. A video shorter than the drawn span yields repeated frames (as the
official code does); `min_frames` in the loader rejects videos with fewer frames than the clip has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, JpegImagePlugin


def as_hw(frame_size: int | Sequence[int]) -> tuple[int, int]:
    """An int or (h, w) frame size as an (h, w) tuple."""
    if isinstance(frame_size, (int, np.integer)):
        return int(frame_size), int(frame_size)
    height, width = frame_size
    return int(height), int(width)


def clip_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on (seed, *keys): e.g. (seed, epoch, record, attempt)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *map(int, keys)])))


def sample_train_frame_indices(
    frame_timestamps: np.ndarray,
    num_frames: int,
    stride_range: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Random-stride clip: (frame indices [T], their timestamps relative to the first sampled frame).

    `frame_timestamps` are the video's frame times in seconds, ascending, starting at 0.
    """
    min_dt, max_dt = stride_range
    deltas = rng.random(num_frames - 1) * (max_dt - min_dt) + min_dt
    offsets = np.concatenate([[0.0], np.cumsum(deltas)])
    max_start = max(0.0, float(frame_timestamps[-1]) - float(offsets[-1]))
    targets = rng.random() * max_start + offsets
    indices = np.abs(frame_timestamps[None, :] - targets[:, None]).argmin(axis=1)
    picked = frame_timestamps[indices]
    return indices, (picked - picked[0]).astype(np.float32)


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) with torchvision's RandomResizedCrop.get_params semantics.

    Ten tries of an area fraction uniform in `scale` and an aspect ratio (w/h) log-uniform in `ratio`;
    if none fits, the largest centred crop whose ratio is clamped into `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, int(round(height * max(ratio)))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


class TrainFrameTransform:
    """RandomResizedCrop + horizontal flip, drawn ONCE per clip and applied to every frame.

    Call it with each frame as a PIL image (ideally still unloaded: JPEG frames are then decoded at
    1/2, 1/4 or 1/8 size through PIL's draft mode whenever the crop, resized to the output size, needs
    no more pixels than that) or as a uint8 [H, W, 3] array. Returns uint8 [out_h, out_w, 3].
    """

    def __init__(self, out_hw: tuple[int, int], scale, ratio_jitter: float, flip: bool, rng: np.random.Generator):
        self.out_h, self.out_w = out_hw
        target_ratio = self.out_w / self.out_h
        self.ratio = (target_ratio / ratio_jitter, target_ratio * ratio_jitter)
        self.scale = tuple(scale)
        self.flip_enabled = flip
        self.rng = rng
        self.box = None  # (top, left, crop_h, crop_w) in full-resolution pixels, drawn on the first frame
        self.flip = False

    def _draw(self, height: int, width: int) -> None:
        self.box = random_resized_crop_box(height, width, self.scale, self.ratio, self.rng)
        self.full_hw = (height, width)
        self.flip = bool(self.flip_enabled and self.rng.random() < 0.5)

    def __call__(self, frame: Image.Image | np.ndarray) -> np.ndarray:
        image = Image.fromarray(frame) if isinstance(frame, np.ndarray) else frame
        width, height = image.size
        if self.box is None:
            self._draw(height, width)
        elif (height, width) != self.full_hw:
            raise ValueError(f"frame size {(height, width)} differs from the clip's first frame {self.full_hw}")
        top, left, crop_h, crop_w = self.box
        factor = 1.0
        if isinstance(image, JpegImagePlugin.JpegImageFile) and image.tile:  # tiles left = not decoded yet
            # Ask for the smallest DCT-scaled decode that still has >= output pixels inside the crop.
            wanted = (math.ceil(width * self.out_w / crop_w), math.ceil(height * self.out_h / crop_h))
            image.draft("RGB", wanted)
            factor = width / image.size[0]
        if image.mode != "RGB":
            image = image.convert("RGB")
        box = (left / factor, top / factor, (left + crop_w) / factor, (top + crop_h) / factor)
        out = np.asarray(image.resize((self.out_w, self.out_h), Image.Resampling.BILINEAR, box=box))
        return np.ascontiguousarray(out[:, ::-1]) if self.flip else out


def resize_bilinear_like_cv2(image_hwc: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with OpenCV's INTER_LINEAR sampling (half-pixel centres, no antialiasing).

    The official evaluation resizes with cv2.resize; matching its sampling keeps evaluation inputs
    within rounding (+-1) of the official ones without depending on OpenCV.
    """
    in_h, in_w = image_hwc.shape[:2]
    if (in_h, in_w) == (out_h, out_w):
        return image_hwc

    def axis_weights(n_in: int, n_out: int):
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0, None)
        low = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        frac = (src - low).astype(np.float32)
        return low, high, frac

    y0, y1, fy = axis_weights(in_h, out_h)
    x0, x1, fx = axis_weights(in_w, out_w)
    image = image_hwc.astype(np.float32)
    rows = image[y0] * (1 - fy)[:, None, None] + image[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def eval_resize_hw(height: int, width: int, frame_size: int | Sequence[int], max_aspect_ratio: float = 2.0):
    """Official `compute_resize_sizes`: an int scales the short side to it (long side capped at
    max_aspect_ratio * size, which squeezes very wide frames such as KITTI's); (h, w) is taken as is."""
    if not isinstance(frame_size, (int, np.integer)):
        return as_hw(frame_size)
    scale = frame_size / min(height, width)
    max_size = int(frame_size * max_aspect_ratio)
    return min(int(round(height * scale)), max_size), min(int(round(width * scale)), max_size)


def square_crops(frames: np.ndarray, labels: np.ndarray | None = None):
    """[B, T, H, W, 3] -> ([2B, T, s, s, 3] (all first crops, then all second crops), labels [2B, T, lh, ~lw/2]
    or [2B, T, ~lh/2, lw], overlap, is_wide). Square frames are returned unchanged with is_wide None.

    Frame crops sit at the two corners (left/right or top/bottom) and overlap; labels are split at the
    midpoint, and when the label length is odd the first half is padded by one ignored row/column (255 for
    integer labels, 0 for depth) so both halves have one shape. overlap = long/short side < 2.
    The official square-crop evaluation of non-square clips: the data pipeline's split_into_square_crops,
    the evaluation protocol and the forecasts all cut wide frames here."""
    h, w = frames.shape[-3:-1]
    if h == w:
        return frames, labels, False, None
    is_wide = w > h
    s = min(h, w)
    if is_wide:
        crops = [frames[..., :s, :s, :], frames[..., :, w - s:, :]]
    else:
        crops = [frames[..., :s, :s, :], frames[..., h - s:, :, :]]
    frames = np.concatenate(crops, axis=0)
    if labels is not None:
        axis = labels.ndim - 1 if is_wide else labels.ndim - 2
        mid = labels.shape[axis] // 2
        first, second = np.split(labels, [mid], axis=axis)
        if first.shape != second.shape:
            pad = [(0, 0)] * labels.ndim
            pad[axis] = (0, 1)
            fill = 255 if np.issubdtype(labels.dtype, np.integer) else 0
            first = np.pad(first, pad, constant_values=fill)
        labels = np.concatenate([first, second], axis=0)
    return frames, labels, max(h, w) / min(h, w) < 2.0, is_wide
