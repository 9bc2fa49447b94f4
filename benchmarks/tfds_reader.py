r"""Clips per second: the prepared ArrayRecord format (data/prepare.py) vs the TFDS layout (data/tfds_builders.py,
read through `tfds.data_source`), same videos, same training pipeline.

  PYTHONPATH=$PWD nice -n 15 python benchmarks/tfds_reader.py [--num_videos=6 --seconds=10 --height=360 --width=640]

Generates --num_videos H.264 videos (textured synthetic-world content, 25 fps, keyframe every 50 frames) in a
temp folder, prepares them both ways at short side 320 (prepare --short_side=320; kinetics700_frames/short320),
then runs `make_train_iterator` (2-frame DeltaTok clips and 8-frame DeltaWorld clips, 256 px, random strides,
RandomResizedCrop, flip) in ONE process with one read thread, as benchmarks/data.md does: clips per CPU-second
is the per-core number to plan with; wall clock is printed too. `bytes/clip` is what the source reads from
disk per clip (the sampled frames' records vs the whole video's example).
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from unittest import mock
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags

from benchmarks import videos
from deltaworld_jax.data import prepare, tfds_builders  # noqa: F401  (registers the builders)
from deltaworld_jax.data.arrayrecord import ArrayRecordSource
from deltaworld_jax.data.config import default_data_config
from deltaworld_jax.data.pipeline import make_train_iterator
from deltaworld_jax.data.tfds_sources import TfdsVideoSource

_NUM_VIDEOS = flags.DEFINE_integer("num_videos", 6, "Generated videos.")
_SECONDS = flags.DEFINE_float("seconds", 10.0, "Length of each video (Kinetics clips are 10 s).")
_HEIGHT = flags.DEFINE_integer("height", 360, "Video height.")
_WIDTH = flags.DEFINE_integer("width", 640, "Video width.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Clips per batch.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 6, "Timed batches per measurement (after one warm-up).")
_FRAMES = flags.DEFINE_list("num_frames", ["2", "8"], "Frames per clip (2: DeltaTok, 8: DeltaWorld).")
_COLD = flags.DEFINE_bool("cold", True, "Also measure with the data files evicted from the page cache before every "
                          "batch (posix_fadvise DONTNEED on this benchmark's own files only): reads from disk.")
_FPS, _GOP, _SHORT_SIDE = 25, 50, 320
TFDS_NAME = "kinetics700_frames/short320"


def panning_frames(video: int, num_frames: int, height: int, width: int):
    """A smooth random texture panning right with a bright square crossing it: compresses like footage."""
    side = height // 4
    for n, background in enumerate(videos.panning_texture(video, num_frames, height, width)):
        frame = background.copy()
        left = (5 * n) % (width - side)
        frame[height // 3:height // 3 + side, left:left + side] = 230
        yield frame


def write_videos(folder: Path) -> None:
    num_frames = int(_SECONDS.value * _FPS)
    for video in range(_NUM_VIDEOS.value):
        videos.write_video(folder / "train" / f"class{video % 3}" / f"video{video:03d}.mp4",
                           panning_frames(video, num_frames, _HEIGHT.value, _WIDTH.value),
                           height=_HEIGHT.value, width=_WIDTH.value, fps=_FPS, gop=_GOP)


def evict(folder: Path) -> None:
    """Drops `folder`'s files from the page cache (clean pages only; other files are untouched)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def record_reads(prepared: ArrayRecordSource, tfds_dir: str, clips: int = 2000) -> None:
    """The readers alone (no JPEG decode): microseconds of CPU to fetch a 2-frame clip's two records."""
    rng = np.random.default_rng(0)
    videos = rng.integers(len(prepared), size=clips)
    wanted = [(prepared.names[v], sorted(int(i) for i in rng.choice(int(prepared._counts[v]), 2, replace=False)))
              for v in videos]

    def prepared_read(name, frames):
        v = prepared.names.index(name)
        return prepared._reader(int(prepared._shard_of[v])).read([int(prepared._first[v]) + i for i in frames])

    def tfds_read(source):
        return lambda name, frames: source._records([int(source._first[source.names.index(name)]) + i
                                                     for i in frames])

    timings = {}
    for name, read in (("arrayrecord (prepare)", prepared_read),
                       ("TFDS layout, direct", tfds_read(TfdsVideoSource(TFDS_NAME, tfds_dir))),
                       ("TFDS layout, tfds.data_source", tfds_read(TfdsVideoSource(TFDS_NAME, tfds_dir,
                                                                                   reader="data_source")))):
        read(*wanted[0])
        start = time.process_time()
        for video, frames in wanted:
            read(video, frames)
        timings[name] = (time.process_time() - start) / clips * 1e6
    print("record fetch, 2 per clip, warm cache: " + ", ".join(f"{k} {v:.0f} us" for k, v in timings.items()))


def measure(config, num_frames: int, cold: bool, tfds_reader: str = "arrayrecord") -> tuple[float, float]:
    config = config.copy_and_resolve_references()
    config.num_frames, config.frame_size, config.exclude_list = num_frames, 256, ""
    config.read_threads, config.read_buffer_size = 1, 1
    # The pipeline builds TfdsVideoSource with its default reader; the other one is swapped in for this measure.
    with mock.patch.object(TfdsVideoSource, "__init__", functools.partialmethod(TfdsVideoSource.__init__,
                                                                                reader=tfds_reader)):
        iterator = make_train_iterator(config, seed=0, batch_size_per_process=_BATCH_SIZE.value, num_workers=0)
    next(iterator)  # warm-up
    wall = cpu = 0.0
    for _ in range(_NUM_BATCHES.value):
        if cold:
            evict(Path(config.root))
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        batch = next(iterator)
        wall, cpu = wall + time.perf_counter() - start_wall, cpu + time.process_time() - start_cpu
    assert batch["frames"].shape == (_BATCH_SIZE.value, num_frames, 256, 256, 3)
    assert not any(iterator.errors.values()), iterator.errors
    clips = _BATCH_SIZE.value * _NUM_BATCHES.value
    return clips / cpu, clips / wall


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        write_videos(tmp / "manual")
        written = time.perf_counter()
        prepare.prepare(str(tmp / "manual" / "train"), str(tmp / "arrayrecord"), num_shards=2, num_workers=1,
                        exclude_list="", short_side=_SHORT_SIDE)
        prepared = time.perf_counter()
        builder = tfds.builder(TFDS_NAME, data_dir=str(tmp / "tfds"))
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp / "manual")))
        built = time.perf_counter()
        source = ArrayRecordSource(str(tmp / "arrayrecord"))
        num_records = int(sum(source._counts))
        frame_bytes = sum(os.path.getsize(p) for p in (tmp / "arrayrecord").glob("*.array_record")) / num_records
        tfds_frame_bytes = sum(os.path.getsize(p) for p in (tmp / "tfds").rglob("*.array_record*")) / num_records
        print(f"{_NUM_VIDEOS.value} videos {_HEIGHT.value}x{_WIDTH.value}, {_SECONDS.value:g} s at {_FPS} fps, "
              f"short side {_SHORT_SIDE}: {num_records} frames, record {frame_bytes / 1e3:.1f} kB (prepare) / "
              f"{tfds_frame_bytes / 1e3:.1f} kB (TFDS); videos {written - start:.0f} s, prepare "
              f"{prepared - written:.0f} s, tfds build {built - prepared:.0f} s")
        record_reads(source, str(tmp / "tfds"))
        print(f"cpu cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, batch {_BATCH_SIZE.value}, "
              f"{_NUM_BATCHES.value} batches, 1 process, 1 read thread, 256 px")
        arrayrecord = default_data_config()
        arrayrecord.source, arrayrecord.root = "arrayrecord", str(tmp / "arrayrecord")
        through_tfds = default_data_config()
        through_tfds.source, through_tfds.root, through_tfds.tfds_name = "tfds", str(tmp / "tfds"), TFDS_NAME
        print(f"{'reader':<32} {'cache':>5} {'frames':>6} {'clips/cpu-s':>12} {'clips/s':>8} {'bytes/clip':>11}")
        for cold in (False, True) if _COLD.value else (False,):
            for num_frames in map(int, _FRAMES.value):
                for name, config, reader, read in (
                        ("arrayrecord (prepare)", arrayrecord, "", num_frames * frame_bytes),
                        ("TFDS layout, direct", through_tfds, "arrayrecord", num_frames * tfds_frame_bytes),
                        ("TFDS layout, tfds.data_source", through_tfds, "data_source", num_frames * tfds_frame_bytes)):
                    per_cpu, per_wall = measure(config, num_frames, cold, reader or "arrayrecord")
                    print(f"{name:<32} {'cold' if cold else 'warm':>5} {num_frames:>6} {per_cpu:>12.1f} "
                          f"{per_wall:>8.1f} {read / 1e3:>8.0f} kB", flush=True)


if __name__ == "__main__":
    app.run(main)
