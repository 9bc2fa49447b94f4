r"""Converts a folder of videos (or of frame folders) into the prepared ArrayRecord format.

  python -m deltaworld_jax.data.prepare --input=/data/kinetics700/train --output=/data/k700_frames \
      --num_shards=1024 [--shard_index=i] [--num_workers=16] [--short_side=320] [--jpeg_quality=90]

With --shard_index=i one shard is written (run one such command per machine or job for a cluster);
without it, every unfinished shard is written by a pool of --num_workers processes. Finished shards
are skipped, so rerunning after an interruption resumes. Videos are assigned to shards round-robin in
sorted order (shard i gets videos i, i+N, ...), so every run agrees on the assignment. Broken videos are
skipped and counted in the shard's index (`skipped`). See arrayrecord.py for the format.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from PIL import Image

from deltaworld_jax.data import arrayrecord, video
from deltaworld_jax.data.sources import DATA_EXCEPTIONS, BrokenInput, FrameFolderSource, VideoFileSource

def _resized(image: Image.Image, short_side: int) -> Image.Image:
    if short_side <= 0 or min(image.size) <= short_side:
        return image
    scale = short_side / min(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _video_frames(path: str, short_side: int, quality: int):
    """(JPEGs of every frame in presentation order, their times from the first frame, (width, height)).

    Frames are encoded as they decode, so memory holds JPEG bytes, never a whole video of pixels."""
    encoded, pts, size, time_base = [], [], None, 1.0
    for frame_pts, time_base, frame in video.decode_all(path):
        image = _resized(frame.to_image(), short_side)
        size = size or image.size
        encoded.append(_jpeg(image, quality))
        pts.append(frame_pts)
    if len(encoded) < 2:
        raise ValueError(f"{len(encoded)} decodable frames")
    order, times = video.relative_times(pts, time_base)
    return [encoded[i] for i in order], times, size


def _folder_frames(frame_paths: list[str], timestamps: np.ndarray, short_side: int, quality: int):
    jpegs, size = [], None
    for path in frame_paths:
        image = Image.open(path)
        if size is None:
            size = _resized(image, short_side).size
        if image.format == "JPEG" and (short_side <= 0 or min(image.size) <= short_side):
            jpegs.append(Path(path).read_bytes())  # already a JPEG at the wanted size: copy, no re-encode
        else:
            jpegs.append(_jpeg(_resized(image, short_side), quality))
    return jpegs, timestamps, size


def encode_input(handle, input_kind: str, short_side: int, jpeg_quality: int):
    """(JPEG bytes of every frame in presentation order, timestamps, (width, height)) of one input of
    `list_inputs`: the one decode path of `prepare` and of the TFDS builders (tfds_builders.py).
    Raises BrokenInput or one of DATA_EXCEPTIONS when the input is unreadable."""
    if input_kind == "videos":
        return _video_frames(handle, short_side, jpeg_quality)
    source, index = handle
    return _folder_frames(source.videos[index][1], source.frame_timestamps(index), short_side, jpeg_quality)


def list_inputs(input_dir: str, input_kind: str, fps: float, exclude_list: str):
    """[(name, reader)] in sorted order; reader() -> (jpegs, timestamps, (width, height))."""
    return _inputs_and_ignored(input_dir, input_kind, fps, exclude_list)[0]


def _inputs_and_ignored(input_dir: str, input_kind: str, fps: float, exclude_list: str):
    """(list_inputs, the files passed over as not videos)."""
    if input_kind == "videos":
        source = VideoFileSource(input_dir, exclude_list=exclude_list)
        if not source.paths:
            raise FileNotFoundError(source.empty_message())
        return [(os.path.relpath(p, input_dir), p) for p in source.paths], source.ignored
    source = FrameFolderSource(input_dir, fps=fps, exclude_list=exclude_list)
    return [(os.path.relpath(folder, input_dir), (source, i)) for i, (folder, _) in enumerate(source.videos)], []


def write_shard(input_dir: str, output_dir: str, input_kind: str = "videos", num_shards: int = 1, shard_index: int = 0,
                fps: float = 25.0, short_side: int = 0, jpeg_quality: int = 90, exclude_list: str = "kinetics") -> str:
    """Writes shard `shard_index` unless it is already finished. Returns 'written' or 'skipped'."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    schema = arrayrecord.schema(num_shards, input=os.path.abspath(input_dir), input_kind=input_kind,
                                short_side=short_side, jpeg_quality=jpeg_quality, exclude_list=exclude_list)
    schema_path = output / arrayrecord.SCHEMA_FILE
    if schema_path.exists():
        existing = json.loads(schema_path.read_text())
        if existing.get("num_shards") != num_shards:
            raise ValueError(f"{output} was prepared with {existing.get('num_shards')} shards, not {num_shards}")
    else:
        arrayrecord.write_atomically(schema_path, json.dumps(schema, indent=2).encode())
    if (output / f"{arrayrecord.shard_stem(shard_index, num_shards)}.index.npz").exists():
        return "skipped"
    stem = arrayrecord.shard_stem(shard_index, num_shards)
    for stale in output.glob(f".{stem}.*.tmp-*"):  # left by an interrupted run of this shard
        stale.unlink()
    inputs = list_inputs(input_dir, input_kind, fps, exclude_list)[shard_index::num_shards]
    writer = arrayrecord.ShardWriter(output, shard_index, num_shards)
    for name, handle in inputs:
        try:
            jpegs, timestamps, (width, height) = encode_input(handle, input_kind, short_side, jpeg_quality)
        except (BrokenInput, *DATA_EXCEPTIONS) as error:  # one broken input never stops a shard
            logging.warning("skipping %s: %s: %s", name, type(error).__name__, error)
            writer.skipped += 1
            continue
        writer.add_video(name, jpegs, timestamps, height, width)
    writer.commit()
    return "written"


def _write_shard_star(kwargs):
    return kwargs["shard_index"], write_shard(**kwargs)


def prepare(input_dir: str, output_dir: str, num_shards: int, num_workers: int = 1, **options) -> dict:
    """Writes every unfinished shard with `num_workers` processes; returns {'written': n, 'skipped': m}."""
    # List once up front: an input with nothing to convert is an error here, not "N shards written".
    inputs, ignored = _inputs_and_ignored(input_dir, options.get("input_kind", "videos"), options.get("fps", 25.0),
                                          options.get("exclude_list", "kinetics"))
    if not inputs:
        raise FileNotFoundError(f"nothing to prepare under {input_dir!r}")
    jobs = [dict(options, input_dir=input_dir, output_dir=output_dir, num_shards=num_shards, shard_index=i)
            for i in range(num_shards)]
    workers = max(1, min(num_workers, len(jobs)))
    counts = {"written": 0, "skipped": 0}
    if workers == 1:
        results = map(_write_shard_star, jobs)
    else:
        # Not fork: this process may already run threads (JAX's, the video decoder's), and a forked child can
        # inherit a lock some thread held at the fork and wait on it forever. On Python 3.12 with jax 0.11 the
        # parallel-shards test hung so: every worker was stuck in the decoder. forkserver starts the workers
        # from a clean, single-threaded server process; they import the package again (seconds, once each).
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(workers)
        results = pool.imap_unordered(_write_shard_star, jobs)
    try:
        for shard_index, result in results:
            counts[result] += 1
            logging.info("shard %d: %s", shard_index, result)
        counts["inputs"], counts["ignored"] = len(inputs), len(ignored)
        counts["unreadable"] = 0
        for shard_index in range(num_shards):  # inputs skipped as unreadable, as recorded in each shard's index
            index_path = Path(output_dir) / f"{arrayrecord.shard_stem(shard_index, num_shards)}.index.npz"
            if index_path.exists():
                with np.load(index_path) as shard_index_file:
                    counts["unreadable"] += int(shard_index_file["skipped"])
    finally:
        if workers > 1:
            pool.close()
            pool.join()
    return counts


def define_flags() -> None:
    """Command-line flags; defined only when this module is the program, so importing it (as the
    benchmark and tests do) adds no global flags that could clash with an application's own."""
    flags.DEFINE_string("input", None, "Folder of videos (any depth) or of frame folders.")
    flags.DEFINE_string("output", None, "Folder to write the shards to.")
    flags.DEFINE_enum("input_kind", "videos", ["videos", "frames"], "What --input holds.")
    flags.DEFINE_integer("num_shards", 16, "Total number of shards.")
    flags.DEFINE_integer("shard_index", -1, "Write only this shard (-1: all unfinished shards).")
    flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "Processes when writing all shards.")
    flags.DEFINE_float("fps", 25.0, "Frame rate of frame folders (<= 0: times from '<i>_<seconds>' names).")
    flags.DEFINE_integer("short_side", 0, "Resize frames so the short side is this (0: keep).")
    flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality of re-encoded frames.")
    flags.DEFINE_string("exclude_list", "kinetics",
                        "'kinetics' (official exclusion list), a file of '<class>/<id>' lines, or ''.")


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.input or not f.output:
        raise app.UsageError("--input and --output are required")
    options = dict(input_kind=f.input_kind, fps=f.fps, short_side=f.short_side, jpeg_quality=f.jpeg_quality,
                   exclude_list=f.exclude_list)
    if f.shard_index >= 0:
        if f.shard_index >= f.num_shards:
            raise app.UsageError(f"--shard_index={f.shard_index} must be < --num_shards={f.num_shards}")
        result = write_shard(f.input, f.output, num_shards=f.num_shards, shard_index=f.shard_index, **options)
        print(f"shard {f.shard_index}: {result}")
        return
    counts = prepare(f.input, f.output, f.num_shards, f.num_workers, **options)
    print(f"{counts['written']} shards written, {counts['skipped']} already finished, {counts['inputs']} inputs "
          f"({counts['unreadable']} unreadable, skipped), {counts['ignored']} other files ignored (not videos; "
          f"both named in the log), output {f.output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
