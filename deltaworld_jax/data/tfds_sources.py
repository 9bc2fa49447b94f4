"""Readers of the TFDS layout (tfds_builders.py) through `tfds.data_source`, for the same Grain pipeline.

- `TfdsVideoSource`: a training source (`config.data.source = "tfds"`, `config.data.root` = the TFDS
  data_dir, `config.data.tfds_name` = e.g. "kinetics700_frames/short320"). One example is one video;
  only the sampled frames' JPEGs are decoded (the same decoder as the prepared format's).
- `TfdsClipSource`: an evaluation set (`config.data.eval.<set>.source = "tfds"`, its `root` = the data_dir):
  each example already is the clip the folder source would load.

Both are picklable into Grain workers: they hold names and open the data source lazily in each process.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence

import numpy as np

from deltaworld_jax.data.arrayrecord import decode_jpegs
from deltaworld_jax.data.sources import BrokenInput, FrameTransform

# Examples kept per process: the loader asks a video's timestamps, then reads its frames (two calls,
# one record read), from a few read threads at once.
_CACHED_EXAMPLES = 8


class _LazyDataSource:
    def __init__(self, name: str, data_dir: str, split: str):
        self.name, self.root, self.split = name, data_dir, split
        self._source = None
        self._length = len(self._data_source())  # opens it once here: a wrong name/dir fails at start-up

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_source"] = None  # file handles are per process
        return state

    def _data_source(self):
        if self._source is None:
            import tensorflow_datasets as tfds

            try:
                builder = tfds.builder(self.name, data_dir=self.root)
            except Exception as error:  # tfds raises DatasetNotFoundError, ValueError, ... for unknown names
                raise ValueError(f"TFDS dataset {self.name!r} not found in {self.root!r}: {error} (build it with "
                                 "`tfds build --imports=deltaworld_jax.data.tfds_builders ...`)") from error
            if not builder.is_prepared():
                raise FileNotFoundError(f"TFDS dataset {self.name!r} is not prepared in {self.root!r}: build it with "
                                        "`tfds build --imports=deltaworld_jax.data.tfds_builders ...`")
            self._source = builder.as_data_source(split=self.split)
        return self._source

    def __len__(self) -> int:
        return self._length

    def describe(self, index: int) -> str:
        return f"{self.root}/{self.name}[{self.split}][{index}]"


class TfdsVideoSource(_LazyDataSource):
    """Training source over one-video-per-example TFDS data (kinetics700_frames)."""

    def __init__(self, name: str, data_dir: str, split: str = "train", min_frames: int = 2):
        super().__init__(name, data_dir, split)
        self.min_frames = min_frames
        self._cache: collections.OrderedDict[int, dict] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        state = super().__getstate__()
        state["_cache"], state["_lock"] = collections.OrderedDict(), None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _example(self, index: int) -> dict:
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
        example = self._data_source()[int(index)]
        with self._lock:
            self._cache[index] = example
            if len(self._cache) > _CACHED_EXAMPLES:
                self._cache.popitem(last=False)
        return example

    def frame_timestamps(self, index: int) -> np.ndarray:
        timestamps = np.asarray(self._example(index)["timestamps"], np.float64)
        if len(timestamps) < self.min_frames:
            raise BrokenInput("too_short", self.describe(index),
                              f"{len(timestamps)} frames, need at least {self.min_frames}")
        return timestamps

    def read_frames(self, index: int, frame_indices: Sequence[int], transform: FrameTransform) -> list[np.ndarray]:
        jpegs = self._example(index)["jpegs"]
        return decode_jpegs([jpegs[int(i)] for i in frame_indices], self.describe(index), transform)


class TfdsClipSource(_LazyDataSource):
    """Evaluation set over one-clip-per-example TFDS data: `load(i)` is the folder source's `load(i)`."""

    def load(self, index: int) -> dict:
        example = self._data_source()[int(index)]
        return {"frames": np.asarray(example["frames"]), "timestamps": np.asarray(example["timestamps"], np.float32),
                "labels": np.asarray(example["labels"]), "sample_index": np.int32(example["sample_index"])}
