"""Readers of the TFDS layout (tfds_builders.py) through `tfds.data_source`, for the same Grain pipeline.

- `TfdsVideoSource`: a training source (`config.data.source = "tfds"`, `config.data.root` = the TFDS
  data_dir, `config.data.tfds_name` = e.g. "kinetics700_frames/short320"). The records are single frames
  (a video's frames contiguous, in order) and a per-video index lies next to them, so, as with the
  prepared format, a clip reads only its sampled frames' records.
- `TfdsClipSource`: an evaluation set (`config.data.eval.<set>.source = "tfds"`, its `root` = the data_dir):
  each example already is the clip the folder source would load.

Both are picklable into Grain workers: they hold names and small arrays and open the data source lazily
in each process.

The per-video index (written by the builder, read here): files `videos-<n>.npz` in the dataset's version
folder, each for videos [n * VIDEOS_PER_INDEX_FILE, (n + 1) * VIDEOS_PER_INDEX_FILE) of the sorted listing
that were readable: video int64 [V], names str [V], num_frames int64 [V], heights / widths int32 [V],
timestamps float64 [sum num_frames] (seconds from each video's first frame). Frame f of video v is the
record with key v * FRAME_SLOTS + f; records are in key order, so its position is the frames of the indexed
videos before v, plus f.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from etils import epath

from deltaworld_jax.data.arrayrecord import cached_reader, decode_jpegs
from deltaworld_jax.data.sources import BrokenInput, FrameTransform

FRAME_SLOTS = 2 ** 20  # frames a video may have (keys are video * FRAME_SLOTS + frame)
VIDEOS_PER_INDEX_FILE = 4096
VIDEO_INDEX_GLOB = "videos-*.npz"


class VideoEntry(NamedTuple):
    video: int  # number in the sorted listing of the input folder
    name: str  # path relative to the input folder
    timestamps: np.ndarray  # float64 [F]
    height: int
    width: int


def write_video_index(entries: Sequence[VideoEntry], folder: str, file_number: int | None = None) -> None:
    """Writes the index files of `entries` (all of one file when `file_number` is given) into `folder`."""
    by_file: dict[int, list[VideoEntry]] = {}
    for entry in entries:
        number = entry.video // VIDEOS_PER_INDEX_FILE
        if file_number is not None and number != file_number:
            raise ValueError(f"video {entry.video} does not belong to index file {file_number}")
        by_file.setdefault(number, []).append(entry)
    for number, group in by_file.items():
        group = sorted(group, key=lambda e: e.video)
        buffer = io.BytesIO()
        np.savez(buffer, video=np.asarray([e.video for e in group], np.int64),
                 names=np.asarray([e.name for e in group], dtype=np.str_),
                 num_frames=np.asarray([len(e.timestamps) for e in group], np.int64),
                 heights=np.asarray([e.height for e in group], np.int32),
                 widths=np.asarray([e.width for e in group], np.int32),
                 timestamps=np.concatenate([e.timestamps for e in group]).astype(np.float64))
        (epath.Path(folder) / f"videos-{number:05d}.npz").write_bytes(buffer.getvalue())


def read_video_index(folder) -> dict[str, np.ndarray]:
    """The index files of a built dataset, concatenated in video order."""
    paths = sorted(epath.Path(folder).glob(VIDEO_INDEX_GLOB))
    if not paths:
        raise FileNotFoundError(f"{folder} has no per-video index ({VIDEO_INDEX_GLOB}): not a dataset built by "
                                "deltaworld_jax.data.tfds_builders, or its build did not finish")
    parts = []
    for path in paths:
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as index:
            parts.append({key: index[key] for key in index.files})
    index = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    order = np.argsort(index["video"], kind="stable")
    if not np.array_equal(order, np.arange(len(order))):
        raise ValueError(f"{folder}: index files out of video order")
    return index


class _LazyDataSource:
    def __init__(self, name: str, data_dir: str, split: str):
        self.name, self.root, self.split = name, data_dir, split
        self._source = None
        self._length = len(self._data_source())  # opens it once here: a wrong name/dir fails at start-up

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_source"] = None  # file handles are per process
        return state

    def _builder(self):
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(self.name, data_dir=self.root)
        except Exception as error:  # tfds raises DatasetNotFoundError, ValueError, ... for unknown names
            raise ValueError(f"TFDS dataset {self.name!r} not found in {self.root!r}: {error} (build it with "
                             "`tfds build --imports=deltaworld_jax.data.tfds_builders ...`)") from error
        if not builder.is_prepared():
            raise FileNotFoundError(f"TFDS dataset {self.name!r} is not prepared in {self.root!r}: build it with "
                                    "`tfds build --imports=deltaworld_jax.data.tfds_builders ...`")
        return builder

    def _data_source(self):
        if self._source is None:
            self._source = self._builder().as_data_source(split=self.split)
        return self._source

    def __len__(self) -> int:
        return self._length

    def describe(self, index: int) -> str:
        return f"{self.root}/{self.name}[{self.split}][{index}]"


class TfdsVideoSource(_LazyDataSource):
    """Training source over kinetics700_frames: one record per frame plus the per-video index.

    reader="arrayrecord" (default) fetches the sampled frames' records from the dataset's ArrayRecord shards
    directly (the shard files and lengths come from the TFDS dataset info) and takes the JPEG out of each
    tf.Example; reader="data_source" goes through `tfds.data_source` and its generic feature decoding. Same
    records, same frames; the direct reader fetches a 2-frame clip's records about 4x faster
    (benchmarks/tfds_reader.py), which is a few percent of a clip's CPU time next to the JPEG decoding."""

    READERS = ("arrayrecord", "data_source")

    def __init__(self, name: str, data_dir: str, split: str = "train", min_frames: int = 2,
                 reader: str = "arrayrecord"):
        if reader not in self.READERS:
            raise ValueError(f"reader={reader!r}: expected one of {self.READERS}")
        super().__init__(name, data_dir, split)
        self.min_frames, self.reader = min_frames, reader
        builder = self._builder()
        index = read_video_index(builder.data_path)
        self.names = index["names"].tolist()
        self._video, self._counts = index["video"], index["num_frames"]
        self._first = np.concatenate([[0], np.cumsum(self._counts)[:-1]]).astype(np.int64)
        self._timestamps = index["timestamps"]
        if int(self._counts.sum()) != self._length:
            raise ValueError(f"{self.describe_dataset()}: the index lists {int(self._counts.sum())} frames but the "
                             f"split holds {self._length} records (an unfinished or mixed build)")
        split_info = builder.info.splits[split]
        self.shard_paths = [str(path) for path in split_info.filepaths]
        self._shard_starts = np.concatenate([[0], np.cumsum(split_info.shard_lengths)]).astype(np.int64)
        self._readers: dict = {}

    def __getstate__(self):
        state = super().__getstate__()
        state["_readers"] = {}  # readers are per process
        return state

    def describe_dataset(self) -> str:
        return f"{self.root}/{self.name}[{self.split}]"

    def __len__(self) -> int:
        return len(self.names)

    def describe(self, index: int) -> str:
        return f"{self.describe_dataset()}:{self.names[index]}"

    def frame_timestamps(self, index: int) -> np.ndarray:
        count = int(self._counts[index])
        if count < self.min_frames:
            raise BrokenInput("too_short", self.describe(index), f"{count} frames, need at least {self.min_frames}")
        start = int(self._first[index])
        return self._timestamps[start:start + count]

    def _records(self, positions: list[int]) -> list[tuple[bytes, int, int]]:
        """(jpeg, video, frame) of the records at `positions` of the split."""
        if self.reader == "data_source":
            return [(r["jpeg"], int(r["video"]), int(r["frame"])) for r in self._data_source().__getitems__(positions)]
        from tensorflow_datasets.proto import tf_example_pb2

        shards = np.searchsorted(self._shard_starts, positions, side="right") - 1
        out = []
        for position, shard in zip(positions, shards):
            record = cached_reader(self._readers, self.shard_paths, int(shard)).read(
                [position - int(self._shard_starts[shard])])[0]
            feature = tf_example_pb2.Example.FromString(record).features.feature
            out.append((feature["jpeg"].bytes_list.value[0], feature["video"].int64_list.value[0],
                        feature["frame"].int64_list.value[0]))
        return out

    def read_frames(self, index: int, frame_indices: Sequence[int], transform: FrameTransform) -> list[np.ndarray]:
        first, video = int(self._first[index]), int(self._video[index])
        records = self._records([first + int(i) for i in frame_indices])
        for (_, record_video, record_frame), frame in zip(records, frame_indices):
            if (record_video, record_frame) != (video, int(frame)):  # costs nothing; guards the layout
                raise ValueError(f"{self.describe(index)}: record {first + int(frame)} holds video {record_video} "
                                 f"frame {record_frame}, expected video {video} frame {frame}")
        return decode_jpegs([jpeg for jpeg, _, _ in records], self.describe(index), transform)


class TfdsClipSource(_LazyDataSource):
    """Evaluation set over one-clip-per-example TFDS data: `load(i)` is the folder source's `load(i)`."""

    def load(self, index: int) -> dict:
        example = self._data_source()[int(index)]
        return {"frames": np.asarray(example["frames"]), "timestamps": np.asarray(example["timestamps"], np.float32),
                "labels": np.asarray(example["labels"]), "sample_index": np.int32(example["sample_index"])}
