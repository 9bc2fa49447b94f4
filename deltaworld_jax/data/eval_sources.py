"""Evaluation sets in their official on-disk layouts, sampled exactly as the official code samples them.

Each source lists fixed 7-frame clips ending at a labelled frame and loads one clip as
{frames uint8 [T, H, W, 3] (native size), timestamps float32 [T] (seconds from the first frame),
labels [T, Hl, Wl], sample_index int32}. Label conventions:

- VSPW (`<root>/val.txt`, `<root>/data/<video>/origin/*.jpg`, `.../mask/*.png`): 124 classes; the mask
  value minus 1, and 255 (ignore) where that is < 0 or >= 124. Every frame is labelled. A clip ends at
  every 20th frame (19, 39, ...), stride int(0.2 s * 15 fps) = 3 frames. uint8 labels.
- Cityscapes (`<root>/leftImg8bit_sequence/val/<city>/*_leftImg8bit.png`,
  `<root>/gtFine/val/<city>/*_gtFine_labelIds.png`): labelIds mapped to the 19 train ids, 255 elsewhere.
  Only the annotated 20th frame of each 30-frame snippet has a label: it is the LAST frame of the clip
  (stride int(0.1875 s * 16 fps) = 3); the other frames' labels are all 255. uint8 labels.
- KITTI (raw drives `<root>/<date>/<drive>/image_02/data/*.png`, depth
  `<root>/{val,train}/<drive>/proj_depth/groundtruth/image_02/*.png`, the Eigen test split shipped with
  this package): clips end at each split frame (stride int(0.2 s * 10 fps) = 2 frames; frames < 19 and
  entries without depth are skipped). Frames and depth get the KB crop (bottom 352 rows, centred 1216
  columns); depth = png / 256 in metres, kept inside the Garg crop and (1e-3, 80), 0 elsewhere (= invalid).
  float32 labels.

VSPW and KITTI clips are shuffled with Python's random.Random(0), as the official code does (so the
first clips, used for pictures, are diverse); Cityscapes keeps sorted order.
"""

from __future__ import annotations

import abc
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from deltaworld_jax.data.sources import DATA_EXCEPTIONS, BrokenInput, open_image, packaged_list

CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
_CITYSCAPES_LUT = np.full(256, 255, np.uint8)
for _label_id, _train_id in CITYSCAPES_TRAIN_IDS.items():
    _CITYSCAPES_LUT[_label_id] = _train_id

VSPW_NUM_CLASSES = 124
KB_CROP_HEIGHT, KB_CROP_WIDTH = 352, 1216
GARG_CROP = (0.40810811, 0.99189189, 0.03594771, 0.96405229)  # top, bottom, left, right (fractions)
KITTI_MIN_DEPTH, KITTI_MAX_DEPTH = 1e-3, 80.0


def _read_rgb(path: str) -> np.ndarray:
    image = open_image(path)
    try:
        return np.asarray(image.convert("RGB"))
    except DATA_EXCEPTIONS as error:
        raise BrokenInput("unreadable", path, f"{type(error).__name__}: {error}") from error


def _read_label(path: str, dtype) -> np.ndarray:
    if not os.path.exists(path):
        raise BrokenInput("missing_label", path, "label file does not exist")
    try:
        with Image.open(path) as image:
            return np.asarray(image, dtype=dtype)
    except DATA_EXCEPTIONS as error:
        raise BrokenInput("missing_label", path, f"unreadable label: {type(error).__name__}: {error}") from error


def kb_crop(array: np.ndarray) -> np.ndarray:
    height, width = array.shape[:2]
    top, left = height - KB_CROP_HEIGHT, (width - KB_CROP_WIDTH) // 2
    if top < 0 or left < 0:
        raise ValueError(f"KITTI frame {height}x{width} is smaller than the KB crop {KB_CROP_HEIGHT}x{KB_CROP_WIDTH}")
    return array[top:top + KB_CROP_HEIGHT, left:left + KB_CROP_WIDTH]


def garg_valid_mask(depth: np.ndarray) -> np.ndarray:
    height, width = depth.shape
    top, bottom, left, right = GARG_CROP
    mask = np.zeros(depth.shape, bool)
    mask[int(top * height):int(bottom * height), int(left * width):int(right * width)] = True
    return mask & (depth > KITTI_MIN_DEPTH) & (depth < KITTI_MAX_DEPTH)


class _ClipListSource(abc.ABC):
    """Shared loading: self.samples = [(frame_paths, frame_indices, label_data)]; labels per subclass."""
    name = "base"
    fps = 1.0

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, index: int) -> str:
        return str(self.samples[index][0][-1])

    @abc.abstractmethod
    def _labels(self, label_data, num_frames: int) -> np.ndarray:
        """Labels [num_frames, Hl, Wl] of one clip."""

    def _frames(self, frame_paths) -> np.ndarray:
        frames = [_read_rgb(str(p)) for p in frame_paths]
        if any(f.shape != frames[0].shape for f in frames):
            raise BrokenInput("unreadable", str(frame_paths[0]), "frames of one clip differ in size")
        return np.stack(frames)

    def load(self, index: int) -> dict:
        frame_paths, frame_indices, label_data = self.samples[index]
        labels = self._labels(label_data, len(frame_paths))  # labels first: a missing label is the cheap check
        frames = self._frames(frame_paths)
        timestamps = np.asarray(frame_indices, np.float64) / self.fps
        return {"frames": frames, "timestamps": (timestamps - timestamps[0]).astype(np.float32),
                "labels": labels, "sample_index": np.int32(index)}


def _fixed_stride_indices(end: int, num_frames: int, stride: int) -> list[int]:
    return list(range(end - (num_frames - 1) * stride, end + 1, stride))


class VSPWSource(_ClipListSource):
    name = "vspw"

    def __init__(self, root: str, num_frames: int = 7, stride_seconds: float = 0.2, fps: float = 15.0,
                 label_interval: int = 20):
        self.root, self.fps = root, fps
        split_file = Path(root) / "val.txt"
        if not split_file.exists():
            raise FileNotFoundError(f"VSPW split file {split_file} not found (expected <root>/val.txt)")
        stride = int(stride_seconds * fps)
        self.samples = []
        for video in (line.strip() for line in split_file.read_text().splitlines()):
            if not video:
                continue
            origin, masks = Path(root) / "data" / video / "origin", Path(root) / "data" / video / "mask"
            images = sorted(p for p in origin.glob("*.jpg") if not p.name.startswith("._"))
            for end in range(label_interval - 1, len(images), label_interval):
                indices = _fixed_stride_indices(end, num_frames, stride)
                if indices[0] < 0:
                    continue
                self.samples.append(([images[i] for i in indices], indices,
                                     [masks / images[i].name.replace(".jpg", ".png") for i in indices]))
        random.Random(0).shuffle(self.samples)

    def _labels(self, label_paths, num_frames):
        labels = []
        for path in label_paths:
            label = _read_label(str(path), np.int64) - 1
            label[(label < 0) | (label >= VSPW_NUM_CLASSES)] = 255
            labels.append(label.astype(np.uint8))
        return np.stack(labels)


class CityscapesSource(_ClipListSource):
    name = "cityscapes"

    def __init__(self, root: str, num_frames: int = 7, stride_seconds: float = 0.1875, fps: float = 16.0):
        self.root, self.fps = root, fps
        frames_dir, label_dir = Path(root) / "leftImg8bit_sequence" / "val", Path(root) / "gtFine" / "val"
        if not label_dir.is_dir():
            raise FileNotFoundError(f"Cityscapes labels {label_dir} not found (expected <root>/gtFine/val/<city>)")
        stride = int(stride_seconds * fps)
        self.samples = []
        for label_path in sorted(label_dir.rglob("*_gtFine_labelIds.png")):
            city, sequence, frame = label_path.name.removesuffix("_gtFine_labelIds.png").split("_")
            indices = _fixed_stride_indices(int(frame), num_frames, stride)
            paths = [frames_dir / label_path.parent.name / f"{city}_{sequence}_{i:06d}_leftImg8bit.png"
                     for i in indices]
            self.samples.append((paths, indices, label_path))

    def _labels(self, label_path, num_frames):
        label = _CITYSCAPES_LUT[_read_label(str(label_path), np.uint8)]
        labels = np.full((num_frames, *label.shape), 255, np.uint8)
        labels[-1] = label
        return labels


class KITTISource(_ClipListSource):
    name = "kitti"

    def __init__(self, root: str, num_frames: int = 7, stride_seconds: float = 0.2, fps: float = 10.0,
                 split_file: str = ""):
        self.root, self.fps = root, fps
        split_path = Path(split_file) if split_file else packaged_list("kitti_eigen_test.txt")
        if not Path(root).is_dir():
            raise FileNotFoundError(f"KITTI root {root} does not exist")
        stride = int(stride_seconds * fps)
        self.samples = []
        for line in split_path.read_text().splitlines():
            parts = line.split()
            if len(parts) < 2 or parts[1] == "None":
                continue
            tokens = parts[0].split("/")
            date, drive, frame = tokens[0], tokens[1], int(Path(tokens[-1]).stem)
            if frame < 19:
                continue
            indices = _fixed_stride_indices(frame, num_frames, stride)
            if indices[0] < 0:
                continue
            depth_dir = next((d for d in (Path(root) / split / drive / "proj_depth" / "groundtruth" / "image_02"
                                          for split in ("val", "train")) if d.exists()), None)
            if depth_dir is None:
                continue
            image_dir = Path(root) / date / drive / "image_02" / "data"
            self.samples.append(([image_dir / f"{i:010d}.png" for i in indices], indices,
                                 [depth_dir / f"{i:010d}.png" for i in indices]))
        random.Random(0).shuffle(self.samples)

    def _frames(self, frame_paths):
        return np.stack([kb_crop(f) for f in super()._frames(frame_paths)])

    def _labels(self, depth_paths, num_frames):
        depths = []
        for path in depth_paths:
            depth = kb_crop(_read_label(str(path), np.float32) / 256.0)
            depths.append(np.where(garg_valid_mask(depth), depth, 0.0).astype(np.float32))
        return np.stack(depths)


class SyntheticEvalSource:
    """Fixed-stride clips of the synthetic world (no labels), held out by construction: eval clip i starts
    at t=0 of world clip len(source) + i, a clip the training source (clips 0 .. len(source)-1 of the same
    world) never reads; `world_index(i)` names it for world.state_at / world.sample_futures (ground truth).
    Frames are rendered directly at the evaluation size (height x width), not resized."""
    name = "synthetic"

    def __init__(self, source, num_clips: int, num_frames: int, stride_seconds: float, height: int, width: int):
        self.source, self.num_clips, self.height, self.width = source, num_clips, height, width
        self.world = source.world
        self.root = source.root
        self.times = [round(i * stride_seconds * source.fps) / source.fps for i in range(num_frames)]

    def __len__(self) -> int:
        return self.num_clips

    def describe(self, index: int) -> str:
        return self.source.describe(index)

    def world_index(self, index: int) -> int:
        return len(self.source) + int(index)

    def load(self, index: int) -> dict:
        states = self.world.states_at(self.world_index(index), self.times)
        frames = np.stack([self.world.render(state, self.height, self.width) for state in states])
        return {"frames": frames, "timestamps": np.asarray(self.times, np.float32), "sample_index": np.int32(index)}
