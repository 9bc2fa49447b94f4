"""Builders of tiny real data sets for the data tests (and for the data benchmark's temp datasets).

Frames carry their own frame number in a corner patch (value 6 * n), so a test can read back which
frame of the video a loader picked, even after resizing.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
from PIL import Image


def numbered_frame(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A frame whose left half is the value 6 * n (readable after resize/crop) and right half noise."""
    rng = np.random.default_rng([seed, n])
    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    frame[:, : width // 2] = (6 * n) % 256
    return frame


def frame_number(frame: np.ndarray) -> int:
    """Reads back the frame number from a (cropped/resized, maybe flipped) numbered frame."""
    width = frame.shape[1]
    left = frame[:, : width // 4].astype(np.float64).mean()
    right = frame[:, -width // 4:].astype(np.float64).mean()
    flat = min((left, frame[:, : width // 4].std()), (right, frame[:, -width // 4:].std()), key=lambda x: x[1])
    return int(round(flat[0] / 6))


def write_mp4(path: str | Path, num_frames: int, height: int = 32, width: int = 32, fps: int = 10,
              gop: int = 4, seed: int = 0) -> None:
    """A tiny H.264 (or MPEG-4) video with keyframes every `gop` frames."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = ({"g": str(gop), "bf": "0", "crf": "10", "sc_threshold": "0"} if codec == "libx264"
                          else {"g": str(gop), "sc_threshold": "0"})  # no scene-cut keyframes: real GOPs
        stream.codec_context.gop_size = gop
        for n in range(num_frames):
            frame = av.VideoFrame.from_ndarray(numbered_frame(n, height, width, seed), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_frames(folder: str | Path, num_frames: int, height: int = 32, width: int = 32, ext: str = ".jpg",
                 seed: int = 0) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(num_frames):
        path = folder / f"{n:05d}{ext}"
        Image.fromarray(numbered_frame(n, height, width, seed)).save(path, quality=95)
        paths.append(path)
    return paths


def make_kinetics_tree(root: Path, num_videos: int = 6, num_frames: int = 20, corrupt: bool = True,
                       height: int = 32, width: int = 32) -> Path:
    """root/train/<class>/<id>.mp4, plus (corrupt=True) one garbage, one empty and one 1-frame video."""
    train = root / "train"
    for v in range(num_videos):
        write_mp4(train / f"class{v % 2}" / f"vid{v:02d}.mp4", num_frames, height, width, seed=v)
    if corrupt:
        (train / "class0" / "garbage.mp4").write_bytes(b"this is not a video" * 50)
        (train / "class1" / "empty.mp4").write_bytes(b"")
        write_mp4(train / "class1" / "short.mp4", 1, height, width)
    return train


def make_vspw(root: Path, num_videos: int = 2, num_frames: int = 40, height: int = 24, width: int = 40) -> Path:
    """VSPW layout; every frame has a mask whose value is (frame number % 120) + 1 everywhere."""
    names = []
    for v in range(num_videos):
        name = f"video{v}"
        names.append(name)
        write_frames(root / "data" / name / "origin", num_frames, height, width, seed=v)
        (root / "data" / name / "mask").mkdir(parents=True, exist_ok=True)
        for n in range(num_frames):
            mask = np.full((height, width), n % 120 + 1, np.uint8)
            mask[0, 0] = 0  # -> 255 (ignore)
            Image.fromarray(mask).save(root / "data" / name / "mask" / f"{n:05d}.png")
    (root / "val.txt").write_text("\n".join(names) + "\n")
    return root


def make_cityscapes(root: Path, height: int = 16, width: int = 32) -> Path:
    """Two 30-frame snippets in one city, labelled on frame 19; label id 7 (road -> train id 0)."""
    city = "frankfurt"
    for seq in ("000000", "000001"):
        for n in range(30):
            folder = root / "leftImg8bit_sequence" / "val" / city
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(numbered_frame(n, height, width)).save(folder / f"{city}_{seq}_{n:06d}_leftImg8bit.png")
        label = np.full((height, width), 7, np.uint8)
        label[:, : width // 4] = 26  # car -> 13
        label[0, 0] = 3  # not a train class -> 255
        gt = root / "gtFine" / "val" / city
        gt.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label).save(gt / f"{city}_{seq}_000019_gtFine_labelIds.png")
    return root


def make_kitti(root: Path, frames: tuple[int, ...] = (30, 40), height: int = 360, width: int = 1230):
    """One raw drive with the frames of 7-frame clips (stride 2) ending at `frames`, depth maps (value 256 * (1 + n / 10) metres), and a
    split file listing `frames`; a KB crop needs >= 352 x 1216 frames."""
    date, drive = "2011_09_26", "2011_09_26_drive_0002_sync"
    image_dir = root / date / drive / "image_02" / "data"
    depth_dir = root / "val" / drive / "proj_depth" / "groundtruth" / "image_02"
    image_dir.mkdir(parents=True)
    depth_dir.mkdir(parents=True)
    for n in sorted({i for end in frames for i in range(end - 12, end + 1, 2)}):  # the clips' frames only
        Image.fromarray(numbered_frame(n, height, width)).save(image_dir / f"{n:010d}.png", compress_level=1)
        depth = np.full((height, width), int(256 * (1 + n / 10)), np.uint16)
        Image.fromarray(depth).save(depth_dir / f"{n:010d}.png", compress_level=1)
    lines = [f"{date}/{drive}/image_02/data/{n:010d}.png {drive}/proj_depth/groundtruth/image_02/{n:010d}.png 721.5"
             for n in frames]
    lines.append(f"{date}/{drive}/image_02/data/0000000005.png None 721.5")
    split = root / "split.txt"
    split.write_text("\n".join(lines) + "\n")
    return root, split
