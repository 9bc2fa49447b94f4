"""Video decoding shared by the forecast command, the training source and `prepare` (PyAV).

One rule for time everywhere: a frame's time is its presentation timestamp minus that of the FIRST
frame in presentation order, in seconds. So a stream whose first frame is stamped 0.54 s (MPEG-2
program streams, cut transport streams, remuxed clips), B-frames (packets out of presentation
order) and variable frame rates all give times that start at 0.0 and follow the real spacing.

Which files are videos: any container FFmpeg demuxes. Known video extensions are taken on sight;
files with an extension that is neither a known video nor a known non-video (images, labels, text)
are opened to look for a video stream, so a `.dat` or extension-less camera file is not lost. Files
passed over are returned too, so callers can count and name them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import av
import numpy as np

# Containers taken by extension (case-insensitive). Anything else that PyAV opens with a video
# stream is taken by content (see is_video).
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".m2v", ".ts", ".m2ts", ".mts",
                    ".m4v", ".3gp", ".3g2", ".ogv", ".flv", ".wmv", ".asf", ".vob", ".mxf", ".dv", ".y4m",
                    ".h264", ".264", ".hevc", ".h265")
# Never opened when sniffing: frames, labels, lists and metadata that sit next to videos in datasets.
NOT_VIDEO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".txt", ".json", ".csv",
                        ".tsv", ".xml", ".yaml", ".yml", ".md", ".npz", ".npy", ".pkl", ".zip", ".tar", ".gz",
                        ".srt", ".vtt", ".wav", ".mp3", ".aac", ".flac", ".m4a", ".ogg", ".opus", ".py", ".html",
                        ".pdf", ".idx", ".index", ".array_record")

# PyAV / FFmpeg errors that mean "this file is not a readable video" (not a bug in our code).
DECODE_ERRORS = (av.error.FFmpegError, OSError, ValueError, EOFError, RuntimeError, IndexError)


class UnreadableVideo(ValueError):
    """The file cannot be used as a video (the message says why)."""


def accepted_extensions_text() -> str:
    return " ".join(VIDEO_EXTENSIONS) + " (other files are opened to look for a video stream)"


def is_video(path: str) -> bool:
    """True for a known video extension; for an unknown one, whether FFmpeg finds a video stream in it."""
    lower = path.lower()
    if lower.endswith(VIDEO_EXTENSIONS):
        return True
    if lower.endswith(NOT_VIDEO_EXTENSIONS) or os.path.getsize(path) == 0:
        return False
    try:
        with av.open(path) as container:
            return bool(container.streams.video)
    except DECODE_ERRORS:
        return False


@dataclasses.dataclass
class VideoListing:
    """Videos found under a folder, and the files passed over (not videos by extension or content)."""

    root: str
    videos: list[str]
    ignored: list[str]

    def summary(self, limit: int = 5) -> str:
        text = f"{len(self.videos)} videos under {self.root}"
        if self.ignored:
            names = ", ".join(os.path.relpath(p, self.root) for p in self.ignored[:limit])
            more = f" and {len(self.ignored) - limit} more" if len(self.ignored) > limit else ""
            text += f"; {len(self.ignored)} other files ignored (not videos): {names}{more}"
        return text

    def require_videos(self) -> "VideoListing":
        """Self, or an error naming the accepted extensions when no video was found."""
        if not self.videos:
            raise FileNotFoundError(f"no videos found under {self.root!r} ({self.summary()}); accepted: "
                                    f"{accepted_extensions_text()}")
        return self


def list_videos(root: str) -> VideoListing:
    """Every video under `root` (any depth, sorted, hidden files and folders skipped)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder {root!r} does not exist")
    videos, ignored = [], []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(directory, name)
            (videos if is_video(path) else ignored).append(path)
    return VideoListing(root, sorted(videos), sorted(ignored))


# ----------------------------------------------------------------------------------------------------
# Frame index (one demux pass, no decoding) and seeking reads
# ----------------------------------------------------------------------------------------------------


class FrameIndex(NamedTuple):
    """pts of every frame in presentation order, pts of the keyframes, seconds per pts tick."""

    pts: np.ndarray
    key_pts: np.ndarray
    time_base: float

    @property
    def times(self) -> np.ndarray:
        """Seconds from the first frame in presentation order (float64)."""
        return (self.pts - self.pts[0]).astype(np.float64) * self.time_base

    @property
    def start_time(self) -> float:
        """The first frame's own stamp (s), as the container gives it."""
        return float(self.pts[0]) * self.time_base


def index_frames(path: str) -> FrameIndex:
    """The frame index from the packets. Containers whose packets do not all carry a pts (some
    elementary and program streams) are indexed by decoding instead, from the frames' own stamps."""
    if os.path.getsize(path) == 0:
        raise UnreadableVideo("empty file")
    with av.open(path) as container:
        stream = video_stream(container)
        time_base = float(stream.time_base)
        pts, key_pts, missing = [], [], 0
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            if packet.pts is None:
                missing += 1
                continue
            pts.append(packet.pts)
            if packet.is_keyframe:
                key_pts.append(packet.pts)
    if missing:
        pts, key_pts = [], []
        with av.open(path) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if frame.pts is not None:
                    pts.append(frame.pts)
                    if frame.key_frame:
                        key_pts.append(frame.pts)
    if not pts:
        raise UnreadableVideo("no frame with a timestamp")
    if not key_pts:
        raise UnreadableVideo("no keyframe")
    pts = np.unique(np.asarray(pts, np.int64))
    # Time 0 is the first frame that DECODES: a stream cut inside a group of pictures starts with frames
    # that reference pictures it lacks; the decoder drops them, so they are no frames of this video.
    first = _first_decoded_pts(path)
    if first is None:
        raise UnreadableVideo("no frame decodes")
    return FrameIndex(pts[pts >= first], np.unique(np.asarray(key_pts, np.int64)), time_base)


def _first_decoded_pts(path: str) -> int | None:
    """pts of the first frame the decoder outputs (frames come out in presentation order)."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # frame threads would delay the first output, not change it
        for frame in container.decode(stream):
            if frame.pts is not None:
                return int(frame.pts)
    return None


class _Overshot(Exception):
    """A seek landed after the frame it was meant to reach (imprecise seeking, e.g. MPEG program streams)."""


def read_frames(path: str, index: FrameIndex, frame_indices: Sequence[int], *, threads: int = 1,
                ) -> list[np.ndarray]:
    """RGB uint8 frames [H, W, 3] at `frame_indices` (positions in `index.pts`, any order, repeats allowed).

    Seeks to the keyframe at or before each needed frame and decodes forward only as far as needed;
    a frame after a later keyframe is reached by another seek rather than by decoding through the gap.
    Containers whose seeks land past the wanted frame are decoded from the start instead."""
    wanted = [int(index.pts[i]) for i in frame_indices]
    try:
        decoded = _read_seeking(path, index, sorted(set(wanted)), threads)
    except _Overshot:
        decoded = _read_from_start(path, set(wanted), threads)
    return [decoded[p] for p in wanted]


def _read_seeking(path: str, index: FrameIndex, needed: list[int], threads: int) -> dict[int, np.ndarray]:
    key_pts = index.key_pts
    wanted_set = set(needed)

    def keyframe_before(p: int) -> int:
        position = np.searchsorted(key_pts, p, side="right") - 1
        return int(key_pts[max(position, 0)])

    decoded: dict[int, np.ndarray] = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        cursor = 0
        for _ in range(len(needed)):  # each pass decodes at least one needed frame or raises
            container.seek(keyframe_before(needed[cursor]), stream=stream, backward=True, any_frame=False)
            first = True
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                if first and frame.pts > needed[cursor]:
                    raise _Overshot()
                first = False
                if frame.pts in decoded or frame.pts not in wanted_set:
                    if frame.pts > needed[cursor]:
                        raise UnreadableVideo(f"frame at pts {needed[cursor]} did not decode")
                    continue
                decoded[frame.pts] = frame.to_ndarray(format="rgb24")
                while cursor < len(needed) and needed[cursor] in decoded:
                    cursor += 1
                if cursor == len(needed) or keyframe_before(needed[cursor]) > frame.pts:
                    break  # done, or the next needed frame is cheaper to reach by seeking
            else:
                if cursor < len(needed):
                    raise UnreadableVideo(f"stream ended before pts {needed[cursor]}")
            if cursor == len(needed):
                break
    if len(decoded) < len(needed):
        raise UnreadableVideo("could not decode all needed frames")
    return decoded


def _read_from_start(path: str, needed: set[int], threads: int) -> dict[int, np.ndarray]:
    decoded: dict[int, np.ndarray] = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        for frame in container.decode(stream):
            if frame.pts in needed:
                decoded[frame.pts] = frame.to_ndarray(format="rgb24")
                if len(decoded) == len(needed):
                    break
    if len(decoded) < len(needed):
        missing = sorted(needed - set(decoded))[:3]
        raise UnreadableVideo(f"frames at pts {missing} did not decode")
    return decoded


def video_stream(container) -> Any:
    """The container's first video stream; UnreadableVideo when it has none."""
    if not container.streams.video:
        raise UnreadableVideo("no video stream")
    return container.streams.video[0]


def decode_all(path: str) -> Iterator[tuple[int, float, av.VideoFrame]]:
    """Every frame in decode order as (pts, time_base, frame); sort by pts for presentation order and
    subtract the smallest pts for times from the first frame (see `relative_times`)."""
    with av.open(path) as container:
        stream = video_stream(container)
        stream.thread_type = "AUTO"
        time_base = float(stream.time_base)
        for frame in container.decode(stream):
            if frame.pts is not None:
                yield frame.pts, time_base, frame


def relative_times(pts: Sequence[int], time_base: float) -> tuple[np.ndarray, np.ndarray]:
    """(presentation order of `pts`, seconds of each from the first frame in that order)."""
    order = np.argsort(np.asarray(pts, np.int64), kind="stable")
    sorted_pts = np.asarray(pts, np.int64)[order]
    return order, (sorted_pts - sorted_pts[0]).astype(np.float64) * time_base


# ----------------------------------------------------------------------------------------------------
# Clips at a stride
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ClipTimes:
    """Frames picked for a clip at a stride: positions in the index, their times (s from the first frame),
    the times that were asked for, and the largest distance between the two (s)."""

    positions: list[int]
    times: np.ndarray
    wanted: np.ndarray
    max_offset: float


def pick_frames(times: np.ndarray, start: float, stride: float, count: int) -> ClipTimes:
    """The frames nearest to start + i * stride (s from the first frame), i < count, stopping at the last
    frame: a wanted time more than half a frame interval past the last frame is not picked."""
    wanted = start + stride * np.arange(count)
    interval = float(np.median(np.diff(times))) if len(times) > 1 else 0.0
    positions = []
    for t in wanted:
        if t > times[-1] + interval / 2:
            break
        positions.append(int(np.argmin(np.abs(times - t))))
    picked = times[positions] if positions else np.zeros(0)
    offset = float(np.max(np.abs(picked - wanted[:len(positions)]))) if positions else 0.0
    return ClipTimes(positions, picked, wanted, offset)
