"""`config.data`: every setting of the data pipeline, with the published recipe as the default."""

from __future__ import annotations

import ml_collections


# config.data.source values (pipeline.make_train_source); all but "synthetic" read config.data.root.
TRAIN_SOURCES = ("synthetic", "videos", "frames", "arrayrecord", "tfds")


def default_synthetic_config() -> ml_collections.ConfigDict:
    """The synthetic stochastic world (see synthetic.py)."""
    return ml_collections.ConfigDict(dict(
        seed=0,  # world seed: clip i is a function of (seed, i) only
        num_clips=100_000,  # clips in the source (a large N stands for "infinite")
        duration=10.0,  # seconds per clip (as a Kinetics clip)
        fps=25.0,  # frame rate of a clip
        height=0,  # native render size, before the random crop / resize; 0 = auto: the output size
        width=0,  # divided by sqrt(min crop scale), so crops are never upsampled
        max_shapes=6,  # shape slots; appearances fill free slots
        initial_shapes=3,
        event_rate=1.0,  # random events (turn / speed change / appearance) per second, whole world
        appear_probability=0.3,  # share of events that add a shape, while a slot is free
        speed_range=(0.15, 0.6),  # world heights per second
        radius_range=(0.06, 0.14),  # world heights
        # Cuts, for a tokenizer's training pairs: the share of training clips whose first frame is black (a cut
        # from black: the pair (black, f0) that every clip's delta-token sequence starts with), and the share whose
        # first frame is another clip's (a scene cut). Their change is the whole frame, so the token gets a strong
        # pair-specific learning signal from the first steps (configs/demo.py uses 0.25 and 0.25;
        # benchmarks/demo.md: without them the demo's token could stay unused).
        from_black_probability=0.0,
        cut_probability=0.0,
    ))


def default_eval_config() -> ml_collections.ConfigDict:
    """Evaluation sets: official layouts, 7-frame clips at the official fixed strides.

    Each set's `source` is "folder" (`root` = the official download) or "tfds" (`root` = a TFDS data_dir
    holding the set built by `tfds build --imports=deltaworld_jax.data.tfds_builders`; its clips were cut
    at the official strides when it was built, so the set's fps / stride fields do not apply). `tfds_name`
    "<builder>/<config>" picks another build than the set's own (tfds_builders.EVAL_BUILDERS; "" = that)."""
    return ml_collections.ConfigDict(dict(
        num_frames=7,
        frame_size=-1,  # int: short side (wide frames are split into two squares); -1: config.data.frame_size
        max_aspect_ratio=2.0,  # long side capped at this times the short side when resizing (official)
        square_crops=True,  # split non-square clips into two square crops (official, for int frame sizes)
        batch_size=1,  # clips per process per batch; > 1 needs equal frame and label sizes (not VSPW)
        num_synthetic_clips=64,  # clips of the "synthetic" eval set
        synthetic_stride_seconds=0.2,
        vspw=ml_collections.ConfigDict(dict(root="", source="folder", tfds_name="", fps=15.0, stride_seconds=0.2,
                                            label_interval=20)),
        cityscapes=ml_collections.ConfigDict(dict(root="", source="folder", tfds_name="", fps=16.0,
                                                  stride_seconds=0.1875)),
        kitti=ml_collections.ConfigDict(dict(root="", source="folder", tfds_name="", fps=10.0, stride_seconds=0.2,
                                             split_file="")),  # "" = the packaged Eigen test split
    ))


def default_data_config() -> ml_collections.ConfigDict:
    """Training source, clip sampling, augmentation, loader settings, and the eval sets under `eval`.

    Fields:
      source: "synthetic" (default, embedded), "videos" (video files, PyAV), "frames" (folders of frame
        images), "arrayrecord" (a folder written by `python -m deltaworld_jax.data.prepare`), or "tfds" (a
        TFDS data_dir holding `tfds_name`, built by `tfds build --imports=deltaworld_jax.data.tfds_builders`).
      root: folder of the source (videos: e.g. <kinetics>/train holding <class>/<id>.mp4; tfds: the data_dir).
      tfds_name: the TFDS dataset of source "tfds", "<builder>/<config>" (tfds_builders.py).
      fps: frame rate of "frames" folders; <= 0 reads times from official '<i>_<seconds>.jpg' names.
      exclude_list: "kinetics" (the official Kinetics exclusion list, packaged), a path, or "".
      num_frames: frames per training clip (8 for world models, 2 for DeltaTok).
      frame_size: output height (and width, unless frame_width > 0); multiples of 16 for the models.
      frame_width: output width for non-square training frames; 0 = square.
      time_stride_range: (min, max) seconds between consecutive sampled frames, drawn uniformly.
      min_video_frames: videos with fewer frames are skipped as too short; 0 means num_frames.
      crop_scale: RandomResizedCrop area fraction range.
      ratio_jitter: aspect ratio drawn log-uniformly in [target / jitter, target * jitter].
      horizontal_flip: flip whole clips with probability 0.5.
      shuffle: shuffle videos (reshuffled every epoch) before sampling clips.
      max_retries: a broken video is replaced by another one of the process's shard, at most this many
        times per clip; then the loader raises an error naming the source (nothing readable).
      num_workers: Grain worker processes (0: in the calling process); make_*_iterator can override.
      worker_buffer_size: batches buffered per worker process.
      read_threads: threads that load batches in each process (PIL and PyAV release the GIL).
      read_buffer_size: batches read ahead by those threads.
      token_cache: a folder of precomputed delta tokens (data/token_cache.py; `python -m
        benchmarks.benchmark tokens` writes one). When set, DeltaWorld trains from those tokens alone
        (the trainer's default data_fn reads them; no VFM or tokenizer in the step). "@<name>" in a recipe
        stage is the folder <workdir>/<name>, written before the stage trains when it does not exist yet.
      token_cache_clips: how many videos of the training source that recipe-built cache tokenises (0: all).
      synthetic: the synthetic world (default_synthetic_config).
      eval: the evaluation sets (default_eval_config).
    """
    return ml_collections.ConfigDict(dict(
        source="synthetic",
        root="",
        tfds_name="kinetics700_frames/full",
        fps=25.0,
        exclude_list="kinetics",
        num_frames=8,
        frame_size=256,
        frame_width=0,
        time_stride_range=(1 / 25, 1 / 3),
        min_video_frames=0,
        crop_scale=(0.6, 1.0),
        ratio_jitter=4 / 3,
        horizontal_flip=True,
        shuffle=True,
        max_retries=16,
        num_workers=0,
        worker_buffer_size=2,
        read_threads=2,
        read_buffer_size=4,
        token_cache="",
        token_cache_clips=0,
        synthetic=default_synthetic_config(),
        eval=default_eval_config(),
    ))
