r"""Data-loader throughput: two-frame training clips per second for each source, at 256 and 512 px.

  python -m benchmarks.data                       # generated data sets in a temp folder
  python -m benchmarks.data --source=arrayrecord --root=/data/k700_frames --sizes=256,512

Without --root, small data sets are generated: --num_videos videos of --seconds seconds at 25 fps,
--height x --width, textured synthetic-world content; H.264 with a keyframe every --gop frames; the
same frames as JPEG folders; and the ArrayRecord preparation of the videos, at full size
("arrayrecord") and with the short side reduced to 320 ("arrayrecord_s320"). Each measurement runs the
real training pipeline (make_train_iterator, num_frames=2, random strides, RandomResizedCrop, flip)
in ONE process with one read thread, so clips/s is per CPU core; `cpu` is the process's CPU time, so
clips per CPU-second stays meaningful on a machine shared with other work.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image

from benchmarks import videos
from deltaworld_jax.data import prepare
from deltaworld_jax.data.config import default_data_config
from deltaworld_jax.data.pipeline import make_train_iterator
from deltaworld_jax.data.synthetic import SyntheticWorld, SyntheticWorldConfig

_SOURCE = flags.DEFINE_string("source", "all", "synthetic, videos, frames, arrayrecord, or all.")
_ROOT = flags.DEFINE_string("root", "", "Folder of the source (default: generate data sets in a temp folder).")
_SIZES = flags.DEFINE_list("sizes", ["256", "512"], "Output frame sizes.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Clips per batch.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 8, "Timed batches per measurement (after one warm-up).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Grain worker processes (0 = per-core number).")
_NUM_VIDEOS = flags.DEFINE_integer("num_videos", 12, "Generated videos.")
_SECONDS = flags.DEFINE_float("seconds", 4.0, "Length of each generated video.")
_HEIGHT = flags.DEFINE_integer("height", 480, "Generated video height.")
_WIDTH = flags.DEFINE_integer("width", 854, "Generated video width.")
_GOP = flags.DEFINE_integer("gop", 50, "Keyframe interval of generated videos (frames).")
_FPS = 25


def textured_frames(video: int, num_frames: int, height: int, width: int):
    """Synthetic-world shapes over a smooth, panning texture (compresses like real footage, not flat)."""
    world = SyntheticWorld(SyntheticWorldConfig(aspect=width / height, event_rate=1.0), seed=video)
    backgrounds = videos.panning_texture(video, num_frames, height, width)
    states = world.states_at(0, [n / _FPS for n in range(num_frames)])
    for state, background in zip(states, backgrounds):
        shapes = world.render(state, height, width)
        mask = shapes.max(axis=-1, keepdims=True) > 95  # shape pixels (backgrounds are darker)
        yield np.where(mask, shapes, background // 2 + shapes // 2)


def generate(folder: Path, num_videos: int, seconds: float, height: int, width: int, gop: int) -> dict:
    """videos/<class>/<id>.mp4, frames/<id>/*.jpg and the prepared ArrayRecord folder."""
    num_frames = int(seconds * _FPS)
    for video in range(num_videos):
        frame_dir = folder / "frames" / f"video{video:03d}"
        frame_dir.mkdir(parents=True, exist_ok=True)

        def frames_also_as_jpegs(video=video, frame_dir=frame_dir):
            for n, frame in enumerate(textured_frames(video, num_frames, height, width)):
                Image.fromarray(frame).save(frame_dir / f"{n:05d}.jpg", quality=90)
                yield frame

        videos.write_video(folder / "videos" / f"class{video % 3}" / f"video{video:03d}.mp4", frames_also_as_jpegs(),
                           height=height, width=width, fps=_FPS, gop=gop)
    prepare.prepare(str(folder / "videos"), str(folder / "arrayrecord"), num_shards=2, num_workers=1,
                    exclude_list="", jpeg_quality=90)
    # The same videos prepared at a reduced size (short side 320): what to store for 256 px training.
    prepare.prepare(str(folder / "videos"), str(folder / "arrayrecord_s320"), num_shards=2, num_workers=1,
                    exclude_list="", jpeg_quality=90, short_side=320)
    return {"videos": folder / "videos", "frames": folder / "frames", "arrayrecord": folder / "arrayrecord",
            "arrayrecord_s320": folder / "arrayrecord_s320"}


def measure(source: str, root: str, size: int, batch_size: int, num_batches: int, num_workers: int) -> dict:
    config = default_data_config()
    config.source, config.root, config.exclude_list = source.split("_")[0], root, ""
    config.num_frames, config.frame_size = 2, size
    config.read_threads, config.read_buffer_size = 1, 1
    config.synthetic.height, config.synthetic.width = _HEIGHT.value, _WIDTH.value
    iterator = make_train_iterator(config, seed=0, batch_size_per_process=batch_size, num_workers=num_workers)
    next(iterator)  # warm-up: worker start, file index caches
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        batch = next(iterator)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert batch["frames"].shape == (batch_size, 2, size, size, 3)
    if num_workers:
        iterator.close()
    clips = batch_size * num_batches
    return {"clips_per_s": clips / wall, "clips_per_cpu_s": clips / cpu if not num_workers else float("nan"),
            "errors": sum(iterator.errors.values())}


def main(argv):
    del argv
    sources = ["synthetic", "videos", "frames", "arrayrecord"] if _SOURCE.value == "all" else [_SOURCE.value]
    with tempfile.TemporaryDirectory() as tmp:
        roots = {"synthetic": ""}
        if _ROOT.value:
            roots.update({s: _ROOT.value for s in sources if s != "synthetic"})
        elif set(sources) - {"synthetic"}:
            start = time.perf_counter()
            roots.update({k: str(v) for k, v in generate(Path(tmp), _NUM_VIDEOS.value, _SECONDS.value,
                                                           _HEIGHT.value, _WIDTH.value, _GOP.value).items()})
            if "arrayrecord" in sources:
                sources.append("arrayrecord_s320")
            jpegs = list(Path(roots["frames"]).rglob("*.jpg"))
            print(f"generated {_NUM_VIDEOS.value} videos {_HEIGHT.value}x{_WIDTH.value}, {_SECONDS.value} s at "
                  f"{_FPS} fps, gop {_GOP.value}, mean JPEG {np.mean([os.path.getsize(p) for p in jpegs]) / 1e3:.0f} kB, "
                  f"in {time.perf_counter() - start:.0f} s")
        print(f"cpu cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, batch {_BATCH_SIZE.value}, "
              f"{_NUM_BATCHES.value} batches, workers {_NUM_WORKERS.value}")
        print(f"{'source':<17} {'size':>5} {'clips/s':>9} {'clips/cpu-s':>12} {'skipped':>8}")
        for source in sources:
            for size in map(int, _SIZES.value):
                result = measure(source, roots[source], size, _BATCH_SIZE.value, _NUM_BATCHES.value,
                                 _NUM_WORKERS.value)
                print(f"{source:<17} {size:>5} {result['clips_per_s']:>9.1f} {result['clips_per_cpu_s']:>12.1f} "
                      f"{result['errors']:>8}", flush=True)


if __name__ == "__main__":
    app.run(main)
