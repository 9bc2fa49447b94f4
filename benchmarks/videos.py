"""Synthetic camera-like videos for the data benchmarks (data.py, tfds_reader.py): a smooth random texture
panning right (it compresses like footage, unlike flat colour), and the H.264 (else MPEG-4) writer.
No command-line flags here, so either benchmark imports it without defining the other's."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import av
import numpy as np
from PIL import Image


def panning_texture(seed: int, num_frames: int, height: int, width: int) -> list[np.ndarray]:
    """Frame n's background [height, width, 3] uint8: a bicubically enlarged random texture, 2 px further
    right per frame."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 2, (width + 2 * num_frames) // 8 + 2, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((coarse.shape[1] * 8, coarse.shape[0] * 8),
                                                        Image.Resampling.BICUBIC))
    return [texture[:height, 2 * n:2 * n + width] for n in range(num_frames)]


def write_video(path: Path, frames: Iterable[np.ndarray], *, height: int, width: int, fps: int, gop: int) -> None:
    """`frames` (RGB uint8 [height, width, 3]) as an .mp4: H.264 where FFmpeg has it, a keyframe every `gop`
    frames (and no others: sc_threshold 0), crf 23."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"g": str(gop), "crf": "23", "preset": "veryfast", "sc_threshold": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
