"""Random-access training sources over whole videos: video files (PyAV) and folders of frame images.

A source is indexed by video. It tells the loader each video's frame timestamps (seconds, starting at
0) and reads just the frames the temporal sampler picked, passing each through a frame transform.
Anything wrong with one video raises `BrokenInput(kind, path, detail)`; the loader counts it by kind
and moves on to another video (see pipeline.py).

Sources are pickled into Grain worker processes, so they hold only paths and small caches; open file
handles are created lazily in the process that reads.
"""

from __future__ import annotations

import collections
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import av
import numpy as np
from absl import logging
from PIL import Image

from deltaworld_jax.data import video
from deltaworld_jax.data.video import VIDEO_EXTENSIONS  # noqa: F401  (re-exported: the accepted containers)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Every way one input can be broken, in the order of the counters carried with each batch.
ERROR_KINDS = ("unreadable", "too_short", "missing_label")

# Exceptions that mean "this input is broken", as opposed to a bug in our code. PIL raises SyntaxError
# for some malformed PNGs; PyAV's errors derive from av.error.FFmpegError (and mostly OSError/ValueError).
DATA_EXCEPTIONS = (OSError, ValueError, EOFError, RuntimeError, IndexError, KeyError, SyntaxError,
                   zlib.error, struct.error, av.error.FFmpegError)

FrameTransform = Callable[[Image.Image | np.ndarray], np.ndarray]


class BrokenInput(Exception):
    """One unusable input (video, frame, label); `kind` is one of ERROR_KINDS."""

    def __init__(self, kind: str, path: str, detail: str):
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}; expected one of {ERROR_KINDS}")
        super().__init__(f"{kind}: {path}: {detail}")
        self.kind, self.path, self.detail = kind, path, detail


def packaged_list(name: str) -> Path:
    """Path of a data list shipped with the package (kinetics_excluded.txt, kitti_eigen_test.txt)."""
    return Path(str(resources.files("deltaworld_jax.data").joinpath(name)))


def read_exclusion_keys(exclude_list: str) -> set[str]:
    """Keys '<class>/<video id>' (no extension) of videos to drop. 'kinetics' = the official list."""
    if not exclude_list:
        return set()
    path = packaged_list("kinetics_excluded.txt") if exclude_list == "kinetics" else Path(exclude_list)
    lines = path.read_text().splitlines()
    return {line.strip().removesuffix(".mp4") for line in lines if line.strip()}


def exclusion_key(path: str) -> str:
    parts = Path(path).parts
    return "/".join(parts[-2:]).rsplit(".", 1)[0] if Path(parts[-1]).suffix else "/".join(parts[-2:])


def list_files(root: str, extensions: Sequence[str]) -> list[str]:
    """All files under `root` with one of `extensions` (case-insensitive), sorted, hidden files skipped."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder {root!r} does not exist")
    found = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found.extend(os.path.join(directory, f) for f in files
                     if not f.startswith(".") and f.lower().endswith(tuple(extensions)))
    return sorted(found)


def drop_excluded(paths: list[str], exclude_list: str) -> list[str]:
    excluded = read_exclusion_keys(exclude_list)
    return [p for p in paths if exclusion_key(p) not in excluded] if excluded else paths


class VideoFileSource:
    """Video files under `root` (e.g. Kinetics `train/<class>/<id>.mp4`) in any container PyAV reads,
    decoded with the shared reader in video.py.

    Frame timestamps come from one demux pass over the packets (no decoding), cached per process, and
    count from the first frame in presentation order. A read seeks to the keyframe at or before each
    needed frame and decodes forward only as far as the needed frames. Files that are not videos (by
    extension or content) are counted in `ignored` and named in the log.
    """

    def __init__(self, root: str, exclude_list: str = "kinetics", min_frames: int = 2, index_cache_size: int = 4096):
        self.root = root
        listing = video.list_videos(root)
        self.ignored = listing.ignored
        if listing.ignored:
            logging.warning("video source: %s", listing.summary())
        self.paths = drop_excluded(listing.videos, exclude_list)
        self.min_frames = min_frames
        self._index_cache_size = index_cache_size
        self._index_cache: collections.OrderedDict[int, video.FrameIndex] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return self.paths[index]

    def empty_message(self) -> str:
        """Why there is nothing to read: what was ignored, and which files are taken."""
        return (f"no videos found under {self.root!r} ({len(self.ignored)} other files ignored"
                f"{': ' + ', '.join(os.path.basename(p) for p in self.ignored[:5]) if self.ignored else ''}); "
                f"accepted: {video.accepted_extensions_text()}")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_index_cache"] = collections.OrderedDict()
        return state

    def _frame_index(self, index: int) -> video.FrameIndex:
        """(sorted pts array, keyframe pts array, time_base) of a video, from its packets."""
        if index in self._index_cache:
            self._index_cache.move_to_end(index)
            return self._index_cache[index]
        path = self.paths[index]
        try:
            entry = video.index_frames(path)
        except DATA_EXCEPTIONS as error:
            raise BrokenInput("unreadable", path, f"{type(error).__name__}: {error}") from error
        if len(entry.pts) < self.min_frames:
            raise BrokenInput("too_short", path, f"{len(entry.pts)} frames, need at least {self.min_frames}")
        self._index_cache[index] = entry
        if len(self._index_cache) > self._index_cache_size:
            self._index_cache.popitem(last=False)
        return entry

    def frame_timestamps(self, index: int) -> np.ndarray:
        return self._frame_index(index).times

    def read_frames(self, index: int, frame_indices: Sequence[int], transform: FrameTransform) -> list[np.ndarray]:
        entry = self._frame_index(index)
        try:
            decoded = video.read_frames(self.paths[index], entry, frame_indices)  # 1 thread: workers parallelise
        except DATA_EXCEPTIONS as error:
            raise BrokenInput("unreadable", self.paths[index], f"{type(error).__name__}: {error}") from error
        return [transform(frame) for frame in decoded]


def _parse_frame_times(paths: Sequence[str]) -> np.ndarray | None:
    """Timestamps from official-style frame names '<index>_<seconds>.jpg', or None if absent."""
    times = []
    for path in paths:
        parts = Path(path).stem.split("_")
        try:
            times.append(float(parts[1]))
        except (IndexError, ValueError):
            return None
    return np.asarray(times, np.float64)


class FrameFolderSource:
    """Folders of frame images, one folder per video (any depth under `root`), frames sorted by name.

    Frame i is at i / fps seconds; with fps <= 0 the times are read from official-style names
    '<index>_<seconds>.jpg'.
    """

    def __init__(self, root: str, fps: float = 25.0, exclude_list: str = "", min_frames: int = 2):
        self.root = root
        self.fps = fps
        self.min_frames = min_frames
        by_folder: dict[str, list[str]] = collections.defaultdict(list)
        for path in list_files(root, IMAGE_EXTENSIONS):
            by_folder[os.path.dirname(path)].append(path)
        folders = drop_excluded(sorted(by_folder), exclude_list)
        self.videos = [(folder, by_folder[folder]) for folder in folders]

    def __len__(self) -> int:
        return len(self.videos)

    def describe(self, index: int) -> str:
        return self.videos[index][0]

    def frame_timestamps(self, index: int) -> np.ndarray:
        folder, frames = self.videos[index]
        if len(frames) < self.min_frames:
            raise BrokenInput("too_short", folder, f"{len(frames)} frames, need at least {self.min_frames}")
        if self.fps > 0:
            return np.arange(len(frames), dtype=np.float64) / self.fps
        times = _parse_frame_times(frames)
        if times is None:
            raise BrokenInput("unreadable", folder, "fps <= 0 and frame names carry no '<index>_<seconds>'")
        return times - times[0]

    def read_frames(self, index: int, frame_indices: Sequence[int], transform: FrameTransform) -> list[np.ndarray]:
        frames = self.videos[index][1]
        return [transform(open_image(frames[i])) for i in frame_indices]


def open_image(path: str) -> Image.Image:
    """Opens (lazily: pixels decode on first use) an image, as BrokenInput when it is unreadable."""
    try:
        image = Image.open(path)
    except FileNotFoundError as error:
        raise BrokenInput("unreadable", path, "missing file") from error
    except DATA_EXCEPTIONS as error:
        raise BrokenInput("unreadable", path, f"{type(error).__name__}: {error}") from error
    return image
