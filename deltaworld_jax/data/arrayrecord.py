"""The prepared training format: ArrayRecord shards of JPEG frames with a small index per shard.

Layout of a prepared folder (written by `python -m deltaworld_jax.data.prepare`):

  dataset.json                          the schema: format name and version, shard count, fields below
  frames-00003-of-00016.array_record    one record per frame: the frame's JPEG bytes, videos contiguous,
                                        frames in presentation order; group_size 1 (true random access)
  frames-00003-of-00016.index.npz       numpy arrays (no pickles): names [V] str, first_record [V] int64,
                                        num_frames [V] int64, heights [V] / widths [V] int32,
                                        timestamps [sum num_frames] float64 (seconds from each video's
                                        first frame), skipped [] int64 (inputs that could not be read)

A shard is finished exactly when its .index.npz exists: both files are written under temporary names
and renamed, the index last, so an interrupted run leaves no half shard that looks finished.
Reading a clip touches only the records of the frames the sampler picked (2 for DeltaTok).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from PIL import Image

from deltaworld_jax.data.sources import BrokenInput, FrameTransform

FORMAT_NAME = "deltaworld_jax.frames"
FORMAT_VERSION = 1
SCHEMA_FILE = "dataset.json"
WRITER_OPTIONS = "group_size:1,uncompressed"  # JPEG is already compressed; 1 record per chunk = random access
READER_OPTIONS = "readahead_buffer_size:0"
MAX_OPEN_SHARDS = 64


def shard_stem(shard_index: int, num_shards: int) -> str:
    return f"frames-{shard_index:05d}-of-{num_shards:05d}"


def schema(num_shards: int, **extra) -> dict:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "num_shards": num_shards,
        "record": "JPEG bytes of one RGB frame; a video's frames are contiguous, in presentation order",
        "index_fields": {
            "names": "str [V] video path relative to the input folder",
            "first_record": "int64 [V] record number of the video's first frame",
            "num_frames": "int64 [V]",
            "heights": "int32 [V]",
            "widths": "int32 [V]",
            "timestamps": "float64 [sum(num_frames)] seconds from the video's first frame",
            "skipped": "int64 [] inputs of this shard that could not be read",
        },
        **extra,
    }


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ShardWriter:
    """Writes one shard under temporary names; `commit()` renames it into place (index last)."""

    def __init__(self, output: Path, shard_index: int, num_shards: int):
        stem = shard_stem(shard_index, num_shards)
        self.records_path = output / f"{stem}.array_record"
        self.index_path = output / f"{stem}.index.npz"
        self._tmp_records = output / f".{stem}.array_record.tmp-{os.getpid()}"
        self._writer = ArrayRecordWriter(str(self._tmp_records), WRITER_OPTIONS)
        self._names, self._first, self._counts, self._heights, self._widths = [], [], [], [], []
        self._timestamps: list[np.ndarray] = []
        self._num_records = 0
        self.skipped = 0

    def add_video(self, name: str, jpegs: Sequence[bytes], timestamps: np.ndarray, height: int, width: int) -> None:
        if len(jpegs) != len(timestamps):
            raise ValueError(f"{name}: {len(jpegs)} frames but {len(timestamps)} timestamps")
        self._names.append(name)
        self._first.append(self._num_records)
        self._counts.append(len(jpegs))
        self._heights.append(height)
        self._widths.append(width)
        self._timestamps.append(np.asarray(timestamps, np.float64))
        for jpeg in jpegs:
            self._writer.write(jpeg)
        self._num_records += len(jpegs)

    def commit(self) -> None:
        self._writer.close()
        os.replace(self._tmp_records, self.records_path)
        buffer = io.BytesIO()
        np.savez(
            buffer,
            names=np.asarray(self._names, dtype=np.str_),
            first_record=np.asarray(self._first, np.int64),
            num_frames=np.asarray(self._counts, np.int64),
            heights=np.asarray(self._heights, np.int32),
            widths=np.asarray(self._widths, np.int32),
            timestamps=(np.concatenate(self._timestamps) if self._timestamps else np.zeros(0, np.float64)),
            skipped=np.asarray(self.skipped, np.int64),
        )
        write_atomically(self.index_path, buffer.getvalue())


class ArrayRecordSource:
    """Random-access source over a prepared folder; reads only the sampled frames' records."""

    def __init__(self, root: str, min_frames: int = 2):
        self.root = root
        self.min_frames = min_frames
        schema_path = Path(root) / SCHEMA_FILE
        if not schema_path.exists():
            raise FileNotFoundError(f"{schema_path} not found: prepare the folder with deltaworld_jax.data.prepare")
        info = json.loads(schema_path.read_text())
        if info.get("format") != FORMAT_NAME or info.get("version") != FORMAT_VERSION:
            raise ValueError(f"{schema_path}: format {info.get('format')} v{info.get('version')}, "
                             f"expected {FORMAT_NAME} v{FORMAT_VERSION}")
        num_shards = int(info["num_shards"])
        self.shard_paths, names, shard_of, first, counts, ts_offsets, timestamps = [], [], [], [], [], [], []
        missing = []
        offset = 0
        for shard in range(num_shards):
            stem = shard_stem(shard, num_shards)
            index_path = Path(root) / f"{stem}.index.npz"
            if not index_path.exists():
                missing.append(index_path.name)
                continue
            with np.load(index_path, allow_pickle=False) as index:
                shard_slot = len(self.shard_paths)
                self.shard_paths.append(str(Path(root) / f"{stem}.array_record"))
                names.extend(index["names"].tolist())
                shard_of.extend([shard_slot] * len(index["names"]))
                first.append(index["first_record"])
                counts.append(index["num_frames"])
                starts = np.concatenate([[0], np.cumsum(index["num_frames"])[:-1]]) if len(index["names"]) else []
                ts_offsets.append(np.asarray(starts, np.int64) + offset)
                timestamps.append(index["timestamps"])
                offset += len(index["timestamps"])
        if missing:
            raise FileNotFoundError(f"{root}: unfinished shards {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                                    "run prepare again to finish them")
        self.names = names
        self._shard_of = np.asarray(shard_of, np.int32)
        self._first = np.concatenate(first) if first else np.zeros(0, np.int64)
        self._counts = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        self._ts_offsets = np.concatenate(ts_offsets) if ts_offsets else np.zeros(0, np.int64)
        self._timestamps = np.concatenate(timestamps) if timestamps else np.zeros(0, np.float64)
        self._readers: dict[int, ArrayRecordReader] = {}

    def __len__(self) -> int:
        return len(self.names)

    def describe(self, index: int) -> str:
        return f"{self.shard_paths[self._shard_of[index]]}:{self.names[index]}"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_readers"] = {}  # readers are per process
        return state

    def _reader(self, shard: int) -> ArrayRecordReader:
        return cached_reader(self._readers, self.shard_paths, shard)

    def frame_timestamps(self, index: int) -> np.ndarray:
        count = int(self._counts[index])
        if count < self.min_frames:
            raise BrokenInput("too_short", self.describe(index), f"{count} frames, need at least {self.min_frames}")
        start = int(self._ts_offsets[index])
        return self._timestamps[start:start + count]

    def read_frames(self, index: int, frame_indices: Sequence[int], transform: FrameTransform) -> list[np.ndarray]:
        first = int(self._first[index])
        records = self._reader(int(self._shard_of[index])).read([first + int(i) for i in frame_indices])
        return decode_jpegs(records, self.describe(index), transform)


def cached_reader(readers: dict[int, ArrayRecordReader], paths: Sequence[str], shard: int) -> ArrayRecordReader:
    """The reader of `paths[shard]` from `readers` (this process's open readers), opening it if needed: at
    most MAX_OPEN_SHARDS open (a run over 1024 shards would otherwise hold 1024 files open in every
    worker), least recently used closed first. Used by this format's reader and the TFDS layout's."""
    reader = readers.pop(shard, None)
    if reader is None:
        if len(readers) >= MAX_OPEN_SHARDS:
            readers.pop(next(iter(readers))).close()
        reader = ArrayRecordReader(str(paths[shard]), READER_OPTIONS)
    readers[shard] = reader  # (re)inserted last = most recently used
    return reader


def decode_jpegs(jpegs: Sequence[bytes], where: str, transform: FrameTransform) -> list[np.ndarray]:
    """Stored JPEG frames -> transformed frames; the transform decodes them (at reduced size when its
    crop allows, PIL draft mode). Shared by this format's reader and the TFDS layout's (tfds_sources.py)."""
    frames = []
    for jpeg in jpegs:
        try:
            image = Image.open(io.BytesIO(jpeg))
        except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
            raise BrokenInput("unreadable", where, f"{type(error).__name__}: {error}") from error
        frames.append(transform(image))
    return frames
