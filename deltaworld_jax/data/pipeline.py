"""Training and evaluation iterators on Grain.

Training: ONE global, endless stream of positions over all videos of the source, each epoch a
permutation seeded by (seed, epoch); global batch k is positions [k*B, (k+1)*B) (B = the global batch),
and process p of P reads its contiguous slice [k*B + p*B/P, k*B + (p+1)*B/P) of it -> one clip per
position, drawn from a generator seeded by (seed, epoch, video, attempt) -> batches of
batch_size_per_process, batched BEFORE the worker split (worker w builds whole batches w, w+N, ..., so
the batch stream is identical for any worker count) -> Grain worker processes -> `TrainIterator`, whose
get_state/set_state (also used by Grain's Orbax CheckpointHandler) resume the exact batch stream, with
any number of workers. Global batch k is the same clips in the same order for ANY process count, so a
run resumed on another topology continues at global batch `step` (`TrainIterator.global_state`): nothing
is replayed or skipped. Within an epoch every video is read once, by one of the processes.

A broken video is replaced by another video of the source, chosen by the attempt's generator; the
failures travel with the clip as counts per kind and are summed into `iterator.errors`, so the counts
are exact and deterministic in any worker layout. After `max_retries` failures in a row the loader
raises an error naming the source.

Evaluation: every clip of the set, in order, this process's share (every process_count-th clip);
broken clips are skipped and counted; batches in the calling process; wide clips split into two
square crops as the official evaluation does (see `split_into_square_crops`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from absl import flags, logging

import grain
from deltaworld_jax.data import eval_sources
from deltaworld_jax.data.arrayrecord import ArrayRecordSource
from deltaworld_jax.data.sampling import (TrainFrameTransform, clip_rng, eval_resize_hw, square_crops,
                                          resize_bilinear_like_cv2, sample_train_frame_indices)
from deltaworld_jax.data.sources import (DATA_EXCEPTIONS, ERROR_KINDS, BrokenInput, FrameFolderSource,
                                         VideoFileSource)
from deltaworld_jax.data.synthetic import SyntheticSource, WorldConfig


def _ensure_absl_flags_parsed() -> None:
    """Grain reads its options through absl flags, in this process and in its workers; a library
    caller (pytest, a notebook) may never have parsed them. Parsing nothing keeps the defaults."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _worker_init(worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    _ensure_absl_flags_parsed()


def synthetic_render_size(data_config) -> tuple[int, int]:
    """Native render size of the synthetic world: as configured, or (0 = auto) just large enough that
    the smallest random crop is never upsampled to the output frame size."""
    c = data_config.synthetic
    out_h, out_w = data_config.frame_size, data_config.frame_width or data_config.frame_size
    grow = 1.0 / math.sqrt(min(data_config.crop_scale))
    return (c.height or math.ceil(out_h * grow)), (c.width or math.ceil(out_w * grow))


def world_config(synthetic_config, aspect: float) -> WorldConfig:
    c = synthetic_config
    return WorldConfig(aspect=aspect, max_shapes=c.max_shapes, initial_shapes=c.initial_shapes,
                       event_rate=c.event_rate, speed_range=tuple(c.speed_range),
                       radius_range=tuple(c.radius_range), appear_probability=c.appear_probability)


def make_train_source(data_config):
    """The random-access video source named by config.data.source."""
    min_frames = data_config.min_video_frames or data_config.num_frames
    kind = data_config.source
    if kind == "synthetic":
        c = data_config.synthetic
        height, width = synthetic_render_size(data_config)
        return SyntheticSource(world_config(c, width / height), c.seed, c.num_clips, c.duration, c.fps, height, width,
                               from_black_probability=c.from_black_probability,
                               cut_probability=c.cut_probability)
    if not data_config.root:
        raise ValueError(f"config.data.root must name the folder of the {kind!r} source")
    if kind == "videos":
        return VideoFileSource(data_config.root, exclude_list=data_config.exclude_list, min_frames=min_frames)
    if kind == "frames":
        return FrameFolderSource(data_config.root, fps=data_config.fps, exclude_list=data_config.exclude_list,
                                 min_frames=min_frames)
    if kind == "arrayrecord":
        return ArrayRecordSource(data_config.root, min_frames=min_frames)
    if kind == "tfds":
        from deltaworld_jax.data.tfds_sources import TfdsVideoSource  # tensorflow_datasets only when asked for

        return TfdsVideoSource(data_config.tfds_name, data_config.root, min_frames=min_frames)
    raise ValueError(f"unknown config.data.source {kind!r}: expected synthetic, videos, frames, arrayrecord or tfds")


# First key of every generator the loader draws, so shuffle and clip generators never share a seed.
_SHUFFLE_KEY, _CLIP_KEY = 1, 2


class TrainClipLoader:
    """Stream position -> one augmented clip; picklable, runs in Grain workers.

    Position p is item p % len(shard) of epoch p // len(shard); the epoch's order is a permutation
    seeded by (seed, epoch). (Grain's own index shuffle costs milliseconds per element on sets of a
    few videos; a cached numpy permutation costs nothing per element at any size.)
    """

    def __init__(self, source, data_config, seed: int, shard: range, process_index: int = 0,
                 process_count: int = 1, batch_size_per_process: int = 0):
        self.source = source
        self.seed = int(seed)
        self.shard = shard  # the videos of the stream: replacements for broken ones come from here too
        # This process's element i is global position (i // b) * b * P + p * b + i % b (b = its batch).
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch = int(batch_size_per_process)
        self.shuffle = bool(data_config.shuffle)
        self._orders: dict[int, np.ndarray] = {}
        self.num_frames = data_config.num_frames
        self.stride_range = tuple(data_config.time_stride_range)
        self.out_hw = (data_config.frame_size, data_config.frame_width or data_config.frame_size)
        self.scale = tuple(data_config.crop_scale)
        self.ratio_jitter = data_config.ratio_jitter
        self.flip = data_config.horizontal_flip
        self.max_retries = data_config.max_retries

    def load_clip(self, video: int, rng: np.random.Generator) -> dict:
        timestamps = self.source.frame_timestamps(video)
        indices, clip_times = sample_train_frame_indices(timestamps, self.num_frames, self.stride_range, rng)
        transform = TrainFrameTransform(self.out_hw, self.scale, self.ratio_jitter, self.flip, rng)
        frames = self.source.read_frames(video, indices, transform)
        return {"frames": np.stack(frames), "timestamps": clip_times}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_orders"] = {}
        return state

    def video_at(self, position: int) -> tuple[int, int]:
        """(epoch, video) of a stream position."""
        epoch, item = divmod(int(position), len(self.shard))
        if self.shuffle:
            order = self._orders.get(epoch)
            if order is None:
                order = clip_rng(self.seed, _SHUFFLE_KEY, epoch).permutation(len(self.shard))
                if len(self._orders) >= 2:  # a worker straddles at most two epochs at a time
                    self._orders.pop(next(iter(self._orders)))
                self._orders[epoch] = order
            item = int(order[item])
        return epoch, self.shard[item]

    def global_position(self, index: int) -> int:
        """This process's element `index` -> its position in the global stream."""
        if self.process_count == 1 or not self.local_batch:
            return int(index)
        batch, within = divmod(int(index), self.local_batch)
        return (batch * self.process_count + self.process_index) * self.local_batch + within

    def __call__(self, index: int, unused_element=None) -> dict:
        epoch, video = self.video_at(self.global_position(index))
        errors = np.zeros(len(ERROR_KINDS), np.int32)
        failures = []
        candidate = int(video)
        for attempt in range(self.max_retries + 1):
            rng = clip_rng(self.seed, _CLIP_KEY, epoch, video, attempt)
            if attempt:
                candidate = self.shard[int(rng.integers(len(self.shard)))]
            try:
                clip = self.load_clip(candidate, rng)
            except BrokenInput as error:
                errors[ERROR_KINDS.index(error.kind)] += 1
                failures.append(str(error))
                continue
            except DATA_EXCEPTIONS as error:
                errors[ERROR_KINDS.index("unreadable")] += 1
                failures.append(f"unreadable: {self.source.describe(candidate)}: {type(error).__name__}: {error}")
                continue
            clip["errors"] = errors
            return clip
        raise RuntimeError(
            f"no readable clip in {self.max_retries + 1} tries from {getattr(self.source, 'root', self.source)} "
            f"(is anything in it readable?); last failures: {failures[-3:]}")


class TrainIterator(grain.DatasetIterator):
    """Batches {frames uint8 [B,T,H,W,3], timestamps float32 [B,T]}; `errors` counts skipped inputs.

    Built from `make_train_iterator`, the state is the number of batches delivered (plus the error
    counts): batch k is a pure function of (config, seed, process, k), so set_state rebuilds the
    pipeline starting at batch k, and a checkpoint resumes the exact stream under any worker count or
    thread settings. Wrapping a ready grain iterator instead (`TrainIterator(iterator)`, e.g. a test's
    toy pipeline whose elements carry "errors") delegates the state to that iterator.
    """

    def __init__(self, pipeline: grain.DatasetIterator | Callable[[int], grain.DatasetIterator]):
        self._build = None if isinstance(pipeline, grain.DatasetIterator) else pipeline
        super().__init__(pipeline if self._build is None else self._build(0))
        self.batches = 0
        self.errors = {kind: 0 for kind in ERROR_KINDS}

    def __next__(self) -> dict:
        batch = next(self._parent)
        self.batches += 1
        for kind, count in zip(ERROR_KINDS, batch.pop("errors").sum(axis=0)):
            self.errors[kind] += int(count)
        return batch

    def get_state(self) -> dict:
        state = {"batches": self.batches, "errors": dict(self.errors)}
        if self._build is None:
            state["pipeline"] = self._parent.get_state()
        return state

    # Global batch k is the same for any process count (make_train_iterator), so the data position of a
    # run saved on another topology is its global step; the skip counts are kept as a total (process 0).
    topology_independent = property(lambda self: self._build is not None)

    def global_state(self, step: int, errors: dict | None = None) -> dict:
        """The state of this process's iterator at global step `step` (one batch per step)."""
        return {"batches": int(step), "errors": dict(errors or {})}

    def set_state(self, state: dict) -> None:
        if self._build is None:
            self._parent.set_state(state["pipeline"])
        else:
            self._parent.close()
            parent = self._build(int(state["batches"]))
            # Grain's own constructor adopts the new parent and its context (no private attributes written).
            super().__init__(parent)
        self.batches = int(state["batches"])
        self.errors = {kind: int(state["errors"].get(kind, 0)) for kind in ERROR_KINDS}


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")


def make_train_iterator(data_config, *, seed: int, batch_size_per_process: int, process_index: int = 0,
                        process_count: int = 1, num_workers: int | None = None) -> TrainIterator:
    """An endless iterator of this process's training batches; deterministic in (config, seed, process)."""
    _check_process(process_index, process_count)
    _ensure_absl_flags_parsed()
    source = make_train_source(data_config)
    if len(source) == 0:
        if hasattr(source, "empty_message"):  # video files: say what was ignored and what is accepted
            raise ValueError(f"{source.empty_message()} (source {data_config.source!r})")
        raise ValueError(f"no videos found in {getattr(source, 'root', data_config.root)!r} "
                         f"(source {data_config.source!r})")
    shard = range(len(source))
    logging.info("train data: %s source %s, %d videos, process %d of %d reads slice %d of every global batch, "
                 "batches of %d", data_config.source, getattr(source, "root", ""), len(source), process_index,
                 process_count, process_index, batch_size_per_process)
    loader = TrainClipLoader(source, data_config, seed, shard, process_index, process_count, batch_size_per_process)
    batches = (grain.MapDataset.range(len(shard)).repeat(None)
               .map_with_index(loader)
               .batch(batch_size_per_process, drop_remainder=True))
    workers = data_config.num_workers if num_workers is None else num_workers
    read_options = grain.ReadOptions(num_threads=data_config.read_threads,
                                     prefetch_buffer_size=data_config.read_buffer_size)

    def build(first_batch: int) -> grain.DatasetIterator:
        dataset = (batches[first_batch:] if first_batch else batches).to_iter_dataset(read_options)
        if workers > 0:
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=data_config.worker_buffer_size),
                worker_init_fn=_worker_init)
        return iter(dataset)

    return TrainIterator(build)


# ---- evaluation ---------------------------------------------------------------------------------

EVAL_SETS = ("vspw", "cityscapes", "kitti", "synthetic")


def make_eval_source(data_config, name: str):
    e = data_config.eval
    if name == "synthetic":
        source = make_train_source(_synthetic_only(data_config))
        size = e.frame_size if e.frame_size > 0 else data_config.frame_size
        height, width = eval_resize_hw(source.height, source.width, size, e.max_aspect_ratio)
        return eval_sources.SyntheticEvalSource(source, e.num_synthetic_clips, e.num_frames,
                                                e.synthetic_stride_seconds, height, width)
    if name not in EVAL_SETS:
        raise ValueError(f"unknown eval set {name!r}; expected one of {EVAL_SETS}")
    c = e[name]
    if not c.root:
        raise ValueError(f"config.data.eval.{name}.root is empty: set it to the {name} folder")
    if c.get("source", "folder") == "tfds":  # root is a TFDS data_dir holding the set's builder (tfds_builders.py)
        from deltaworld_jax.data.tfds_sources import TfdsClipSource

        builder, split = _tfds_eval_builder(name)
        return TfdsClipSource(c.get("tfds_name", "") or builder, c.root, split)
    if name == "vspw":
        return eval_sources.VSPWSource(c.root, e.num_frames, c.stride_seconds, c.fps, c.label_interval)
    if name == "cityscapes":
        return eval_sources.CityscapesSource(c.root, e.num_frames, c.stride_seconds, c.fps)
    return eval_sources.KITTISource(c.root, e.num_frames, c.stride_seconds, c.fps, c.split_file)


def _tfds_eval_builder(name: str) -> tuple[str, str]:
    from deltaworld_jax.data.tfds_builders import EVAL_BUILDERS  # registers the builders with TFDS

    return EVAL_BUILDERS[name]


def _synthetic_only(data_config):
    config = data_config.copy_and_resolve_references()
    config.source = "synthetic"
    return config


class EvalClipLoader:
    """Clip index -> resized clip, or ('broken', kind) so the main process can count it."""

    def __init__(self, source, frame_size: int, max_aspect_ratio: float):
        self.source, self.frame_size, self.max_aspect_ratio = source, frame_size, max_aspect_ratio

    def __call__(self, index: int):
        try:
            clip = self.source.load(int(index))
        except BrokenInput as error:
            return {"broken": np.int32(ERROR_KINDS.index(error.kind)), "sample_index": np.int32(index)}
        except DATA_EXCEPTIONS:
            return {"broken": np.int32(ERROR_KINDS.index("unreadable")), "sample_index": np.int32(index)}
        height, width = clip["frames"].shape[1:3]
        new_h, new_w = eval_resize_hw(height, width, self.frame_size, self.max_aspect_ratio)
        clip["frames"] = np.stack([resize_bilinear_like_cv2(f, new_h, new_w) for f in clip["frames"]])
        return clip


def _stack(clips: list[dict], name: str) -> dict:
    batch = {}
    for key in clips[0]:
        shapes = {np.shape(c[key]) for c in clips}
        if len(shapes) > 1:
            raise ValueError(f"eval set {name}: clips of one batch differ in {key} shape {sorted(shapes)}; "
                             "use config.data.eval.batch_size = 1 for sets with mixed frame sizes")
        batch[key] = np.stack([c[key] for c in clips])
    return batch


def split_into_square_crops(batch: dict) -> dict:
    """Official square-crop evaluation of non-square clips, on a batch of B clips.

    Frames become two overlapping squares at opposite ends (left/right when wide, top/bottom when
    tall): [2B, T, S, S, 3], first crops of every clip, then second crops. Labels become two
    NON-overlapping halves split at the middle, so no pixel is scored twice; when the label size is odd
    the first half gets one padding row/column of ignore (255 for integer labels, 0 for depth) at its far
    edge (sampling.square_crops).
    Adds is_split, is_wide, overlap (max/min side ratio < 2) and crop_index, all [2B] (all False/0
    when the clips are square and nothing is split).
    """
    frames = batch["frames"]
    height, width = frames.shape[2:4]
    count = frames.shape[0]
    if height == width:
        return {**batch, "is_split": np.zeros(count, bool), "is_wide": np.zeros(count, bool),
                "overlap": np.zeros(count, bool), "crop_index": np.zeros(count, np.int32)}
    out = {key: np.concatenate([value, value]) for key, value in batch.items() if key not in ("frames", "labels")}
    out["frames"], labels, overlap, wide = square_crops(frames, batch.get("labels"))
    if "labels" in batch:
        out["labels"] = labels
    out["is_split"] = np.ones(2 * count, bool)
    out["is_wide"] = np.full(2 * count, wide)
    out["overlap"] = np.full(2 * count, overlap)
    out["crop_index"] = np.repeat(np.arange(2, dtype=np.int32), count)
    return out


class EvalIterator:
    """Iterates once over this process's share of an eval set; `errors` counts skipped clips."""

    def __init__(self, name: str, elements, batch_size: int, square_crops: bool, root: str = ""):
        self.name, self._elements, self.batch_size, self.square_crops = name, elements, batch_size, square_crops
        self.root = root
        self.errors = {kind: 0 for kind in ERROR_KINDS}
        self.num_clips = 0

    def __iter__(self):
        return self

    def _finish(self, clips: list[dict]) -> dict:
        batch = _stack(clips, self.name)
        self.num_clips += len(clips)
        return split_into_square_crops(batch) if self.square_crops else batch

    def __next__(self) -> dict:
        clips = []
        for element in self._elements:
            if "broken" in element:
                self.errors[ERROR_KINDS[int(element["broken"])]] += 1
                continue
            clips.append(element)
            if len(clips) == self.batch_size:
                return self._finish(clips)
        self.close()  # exhausted: stop the worker processes now rather than at garbage collection
        if clips:
            return self._finish(clips)
        if self.num_clips == 0 and any(self.errors.values()):
            raise RuntimeError(f"eval set {self.name}: none of this process's clips in {self.root!r} could be "
                               f"read (skipped: {self.errors})")
        raise StopIteration

    def close(self) -> None:
        if hasattr(self._elements, "close"):
            self._elements.close()


def make_eval_iterator(data_config, name: str, *, batch_size_per_process: int | None = None,
                       process_index: int = 0, process_count: int = 1,
                       num_workers: int | None = None) -> EvalIterator:
    """One pass over eval set `name` ("vspw", "cityscapes", "kitti", "synthetic").

    Batches: frames uint8 [B', T, S, S, 3] (B' = 2B when clips are split into square crops), timestamps
    float32 [B', T], labels [B', T, Hl, Wl] at label resolution (uint8 classes with 255 = ignore for
    VSPW/Cityscapes, float32 metres with 0 = invalid for KITTI; none for synthetic), sample_index int32
    [B'], and the crop fields of split_into_square_crops.
    """
    _check_process(process_index, process_count)
    _ensure_absl_flags_parsed()
    e = data_config.eval
    source = make_eval_source(data_config, name)
    if len(source) == 0:
        raise ValueError(f"eval set {name}: no clips found under {getattr(source, 'root', '?')!r}")
    frame_size = e.frame_size if e.frame_size > 0 else data_config.frame_size
    dataset = (grain.MapDataset.range(len(source))[process_index::process_count]
               .map(EvalClipLoader(source, frame_size, e.max_aspect_ratio))
               .to_iter_dataset(grain.ReadOptions(num_threads=data_config.read_threads,
                                                  prefetch_buffer_size=data_config.read_buffer_size)))
    workers = data_config.num_workers if num_workers is None else num_workers
    if workers > 0:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=_worker_init)
    return EvalIterator(name, iter(dataset), batch_size_per_process or e.batch_size, e.square_crops,
                        root=str(getattr(source, "root", "")))
