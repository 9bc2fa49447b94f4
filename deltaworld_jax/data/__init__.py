"""Video data for DeltaTok / DeltaWorld: sources, clip sampling, augmentation and Grain loaders.

Entry points (all settings in `config.data`, see `default_data_config()`):

  make_train_iterator(config.data, seed=, batch_size_per_process=, process_index=, process_count=,
                      num_workers=) -> TrainIterator: endless; get_state()/set_state() resume the exact
                      batch stream (it is a grain DatasetIterator, so grain.checkpoint.CheckpointHandler
                      saves it with Orbax); `.errors` counts skipped inputs by kind.
  make_eval_iterator(config.data, "vspw" | "cityscapes" | "kitti" | "synthetic", ...) -> one pass.
  placement.place_batch(batch, mesh, data_axes) -> global jax.Arrays sharded over the batch axis.

Batch contract. Training: {frames uint8 [B, T, H, W, 3], timestamps float32 [B, T]}, B per process,
T = config.data.num_frames, timestamps in seconds from each clip's first frame. Evaluation adds
labels [B', T, Hl, Wl] at label resolution (VSPW/Cityscapes: uint8 class ids, 255 = ignore; KITTI:
float32 metres, 0 = invalid), sample_index int32 [B'], and for clips split into two square crops
(the official evaluation of wide frames) is_split, is_wide, overlap bool [B'] and crop_index int32
[B']; B' = 2B when split (first crops of all clips, then second crops). Labels are never resized:
predictions are brought to label resolution (see pipeline.split_into_square_crops for the layout).

Which training source to use:
- "synthetic" (default): the embedded stochastic world (synthetic.py); no download, any size, exact
  ground-truth futures. For demos, tests and checking that diversity is learned.
- "arrayrecord": the prepared format (arrayrecord.py, written by `python -m deltaworld_jax.data.prepare`).
  Use it for real training runs: a clip reads only its sampled frames' JPEGs, JPEGs decode at reduced
  size when the crop allows (PIL draft mode), and shards split across machines. Fastest by far.
- "videos": video files read directly with PyAV (e.g. Kinetics `train/<class>/<id>.mp4`); no
  preparation, but each clip decodes forward from the keyframe before each needed frame (the frame
  index from one demux pass is cached per worker), so it is several times slower per clip (benchmarks/data.md: 18 vs 80-127 clips/s per core at 256 px). Fine for small
  sets and for first experiments.
- "frames": folders of JPEG/PNG frames with a frame rate (or official '<i>_<seconds>.jpg' names);
  every file is listed at start-up, so it suits small sets (or `prepare --input_kind=frames` them).
- "tfds": the same layout as "arrayrecord" (one record per frame, a per-video index) as a TFDS dataset
  (tfds_builders.py: `tfds build`, on one machine or with Apache Beam on many), read as fast
  (tfds_sources.py); `root` is the TFDS data_dir, `tfds_name` the dataset. The eval sets can be read
  from TFDS builds of their clips too (`config.data.eval.<set>.source = "tfds"`).
Broken inputs (corrupt, truncated, empty or too-short videos, unreadable images, missing labels) are
skipped and counted, never fatal; a source where nothing can be read is an error naming its path.
"""

from deltaworld_jax.data.config import default_data_config, default_eval_config, default_synthetic_config

_LAZY = {
    "make_train_iterator": "deltaworld_jax.data.pipeline",
    "make_eval_iterator": "deltaworld_jax.data.pipeline",
    "make_train_source": "deltaworld_jax.data.pipeline",
    "split_into_square_crops": "deltaworld_jax.data.pipeline",
    "TrainIterator": "deltaworld_jax.data.pipeline",
    "EvalIterator": "deltaworld_jax.data.pipeline",
    "place_batch": "deltaworld_jax.data.placement",
    "SyntheticWorld": "deltaworld_jax.data.synthetic",
    "WorldConfig": "deltaworld_jax.data.synthetic",
}

__all__ = ["default_data_config", "default_eval_config", "default_synthetic_config", *_LAZY]


def __getattr__(name):
    # Grain and PyAV load only when a loader is built, so `import deltaworld_jax.data` stays cheap.
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deltaworld_jax.data' has no attribute {name!r}")
