r"""TFDS builders of the training and evaluation sets, written as ArrayRecord for Grain (tfds_sources.py).

  # One machine (the manual_dir holds the official download, see each builder's MANUAL_DOWNLOAD_INSTRUCTIONS;
  # pip install -e ".[beam]" first: tensorflow-datasets 4.9.10's `tfds` command imports apache_beam and
  # mlcroissant. In Python, builder.download_and_prepare(download_config=DownloadConfig(manual_dir=...))
  # needs neither):
  tfds build --imports=deltaworld_jax.data.tfds_builders kinetics700_frames/short320 \
      --manual_dir=/data/kinetics700 --data_dir=/data/tfds
  # Many machines: the same build as an Apache Beam pipeline, e.g. on Dataflow. The videos are listed and
  # decoded (PyAV) from a file system path, so --manual_dir must be mounted alike on every worker (gcsfuse,
  # NFS); --data_dir may be a bucket.
  tfds build --imports=deltaworld_jax.data.tfds_builders kinetics700_frames --manual_dir=/mnt/k700 \
      --data_dir=gs://b/tfds --beam_pipeline_options="runner=DataflowRunner,project=P,region=R,..."

Builders (names as TFDS registers them):
  kinetics700_frames         the prepared format's layout in TFDS: one example per FRAME (its JPEG bytes,
                             video and frame number), a video's frames contiguous and in presentation order
                             (integer keys, no TFDS shuffling), plus a per-video index next to the records
                             (tfds_sources.VIDEO_INDEX_GLOB: names, frame counts, timestamps, sizes), so a
                             clip reads only its sampled frames. Configs: `full` (frames at their size) and
                             `short320` (short side 320). Frames come from the decoder `python -m
                             deltaworld_jax.data.prepare` uses (prepare.encode_input). One example per video
                             was measured first and dropped: a 2-frame clip then reads and parses the
                             whole video (8x fewer clips per CPU-second, benchmarks/RESULTS.md).
  vspw_clips, cityscapes_sequence_clips, kitti_eigen_clips
                             one example per official evaluation clip, exactly what the folder source of
                             eval_sources.py loads (it is run to make them): frames uint8 [T, H, W, 3],
                             timestamps float32 [T], labels [T, Hl, Wl] (uint8 classes, 255 = ignore; KITTI
                             float32 metres, 0 = invalid), sample_index (the clip's place in the official
                             order, which the examples keep: no TFDS shuffling). Arrays are stored zlib-
                             compressed (lossless; eval numbers do not move).

Broken inputs are skipped and counted, never fatal: a warning names each, the local build logs the count
per split, and a Beam build counts them in the pipeline's metrics (`deltaworld_jax/skipped_inputs`).
The readers are tfds_sources.py (`config.data.source = "tfds"`, `config.data.eval.<set>.source = "tfds"`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from deltaworld_jax.data import eval_sources, prepare, tfds_sources
from deltaworld_jax.data.sources import DATA_EXCEPTIONS, BrokenInput

FILE_FORMAT = "array_record"  # random access for Grain; `tfds build --file_format=...` may still choose another
SKIPPED_COUNTER = ("deltaworld_jax", "skipped_inputs")


def _skip(name: str, error: Exception) -> None:
    logging.warning("skipping %s: %s: %s", name, type(error).__name__, error)


def _beam_count_skipped() -> None:
    import apache_beam as beam  # only inside a Beam worker

    beam.metrics.Metrics.counter(*SKIPPED_COUNTER).inc()


def _video_frames(item, *, short_side: int, jpeg_quality: int):
    """([(key, frame example)], index entry) of one video, or None when it cannot be read. Key =
    video * FRAME_SLOTS + frame, so sorted keys put each video's frames together and in order."""
    video_index, name, path = item
    try:
        jpegs, timestamps, (width, height) = prepare.encode_input(path, "videos", short_side, jpeg_quality)
    except (BrokenInput, *DATA_EXCEPTIONS) as error:
        _skip(name, error)
        return None
    if len(jpegs) >= tfds_sources.FRAME_SLOTS:
        _skip(name, ValueError(f"{len(jpegs)} frames, more than the layout's {tfds_sources.FRAME_SLOTS}"))
        return None
    examples = [(video_index * tfds_sources.FRAME_SLOTS + frame, {"jpeg": jpeg, "video": video_index, "frame": frame})
                for frame, jpeg in enumerate(jpegs)]
    return examples, tfds_sources.VideoEntry(video_index, name, np.asarray(timestamps, np.float64), height, width)


def _clip_example(index: int, *, source):
    """[(index, example)] of evaluation clip `index` of a folder source, or [] when it cannot be read."""
    try:
        clip = source.load(index)
    except (BrokenInput, *DATA_EXCEPTIONS) as error:
        _skip(source.describe(index), error)
        return []
    return [(index, {"frames": clip["frames"], "timestamps": clip["timestamps"], "labels": clip["labels"],
                     "sample_index": np.int32(index), "name": source.describe(index)})]


class _ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared: ArrayRecord by default; a local loop, or a Beam PTransform when the build runs with Beam
    (`tfds build --beam_pipeline_options=...`, or DownloadConfig(beam_runner=/beam_options=))."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format or FILE_FORMAT, **kwargs)
        self._with_beam = False

    def _generate_splits(self, dl_manager, download_config):
        # The builder decides between a Python loop and a Beam transform from how the build was asked for.
        self._with_beam = bool(download_config.beam_runner or download_config.beam_options)
        return super()._generate_splits(dl_manager, download_config)

    def _examples(self, items: list, make_examples):
        """The examples of `items` via `make_examples(item) -> [(key, example)]`, in Beam or in a loop."""
        if self._with_beam:
            import apache_beam as beam

            def counted(item):
                examples = make_examples(item)
                if not examples:
                    _beam_count_skipped()
                return examples

            return beam.Create(items) | beam.FlatMap(counted)
        return self._local_examples(items, make_examples)

    def _local_examples(self, items, make_examples):
        skipped = 0
        for item in items:
            examples = make_examples(item)
            skipped += not examples
            yield from examples
        logging.info("%s: %d of %d inputs skipped as unreadable", self.name, skipped, len(items))

    def _manual_root(self, dl_manager) -> Path:
        root = Path(os.fspath(dl_manager.manual_dir))
        if not root.is_dir():
            raise FileNotFoundError(f"{self.name}: manual_dir {root} does not exist; "
                                    f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
        return root


@dataclasses.dataclass(eq=False)
class KineticsConfig(tfds.core.BuilderConfig):
    short_side: int = 0  # resize so the short side is this (0: keep the video's size)
    jpeg_quality: int = 90
    exclude_list: str = "kinetics"  # the official exclusion list (packaged), a file, or ""


class Kinetics700Frames(_ManualBuilder):
    """Kinetics-700 training videos as JPEG frames with timestamps, one example per video."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download the Kinetics-700 train split (e.g. with github.com/cvdfoundation/kinetics-dataset) and pass
    its folder as --manual_dir: `<manual_dir>/train/<class>/<youtube id>.mp4` (or the class folders directly
    under <manual_dir>). Any container FFmpeg reads is taken; videos on the official exclusion list are left out.
    """
    BUILDER_CONFIGS = [
        KineticsConfig(name="full", description="frames at the videos' own size"),
        KineticsConfig(name="short320", short_side=320, description="frames resized to a short side of 320"),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Kinetics-700 train videos as JPEG frames, one example per frame, plus a per-video index.",
            features=tfds.features.FeaturesDict({
                "jpeg": tfds.features.Tensor(shape=(), dtype=np.object_),  # bytes, decoded only when sampled
                "video": tfds.features.Scalar(dtype=np.int64),
                "frame": tfds.features.Scalar(dtype=np.int64),
            }),
            disable_shuffling=True,  # records in key order: each video's frames contiguous (tfds_sources.py)
            homepage="https://github.com/cvdfoundation/kinetics-dataset")

    def _split_generators(self, dl_manager):
        root = self._manual_root(dl_manager)
        videos = root / "train" if (root / "train").is_dir() else root
        inputs = prepare.list_inputs(str(videos), "videos", fps=0.0, exclude_list=self.builder_config.exclude_list)
        # Video numbers from the sorted listing: the same in every build and on every Beam worker.
        return {"train": self._generate_examples([(i, name, str(path)) for i, (name, path) in enumerate(inputs)])}

    def _generate_examples(self, inputs):
        c = self.builder_config
        encode = functools.partial(_video_frames, short_side=c.short_side, jpeg_quality=c.jpeg_quality)
        index_dir = str(self.data_path)  # during a build: the folder that becomes the dataset's
        if self._with_beam:
            import apache_beam as beam

            return beam.Create(inputs) | _frames_and_index(encode, index_dir)
        return self._local_frames(inputs, encode, index_dir)

    def _local_frames(self, inputs, encode, index_dir: str):
        entries, skipped = [], 0
        for item in inputs:
            result = encode(item)
            if result is None:
                skipped += 1
                continue
            yield from result[0]
            entries.append(result[1])
        tfds_sources.write_video_index(entries, index_dir)
        logging.info("%s: %d of %d videos skipped as unreadable", self.name, skipped, len(inputs))


def _frames_and_index(encode, index_dir: str):
    """Beam: videos -> frame examples, and the per-video index written in files of VIDEOS_PER_INDEX_FILE."""
    import apache_beam as beam

    def encoded(item):
        result = encode(item)
        if result is None:
            _beam_count_skipped()
            return []
        return [result]

    def write_index_file(number, entries):
        tfds_sources.write_video_index(list(entries), index_dir, file_number=number)

    @beam.ptransform_fn
    def frames_and_index(videos):
        results = videos | "Encode" >> beam.FlatMap(encoded)
        _ = (results
             | "IndexEntries" >> beam.Map(lambda r: (r[1].video // tfds_sources.VIDEOS_PER_INDEX_FILE, r[1]))
             | "GroupIndexFiles" >> beam.GroupByKey()
             | "WriteIndexFiles" >> beam.MapTuple(write_index_file))
        return results | "Frames" >> beam.FlatMap(lambda r: r[0])

    return frames_and_index()  # pylint: disable=no-value-for-parameter


class _EvalClipsBuilder(_ManualBuilder, skip_registration=True):
    """One example per clip of an eval_sources folder source, in its (official) order."""

    LABEL_DTYPE = np.uint8
    SPLIT = "validation"
    DESCRIPTION = ""
    HOMEPAGE = ""

    def _info(self) -> tfds.core.DatasetInfo:
        zlib = tfds.features.Encoding.ZLIB
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "frames": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8, encoding=zlib),
                "timestamps": tfds.features.Tensor(shape=(None,), dtype=np.float32),
                "labels": tfds.features.Tensor(shape=(None, None, None), dtype=self.LABEL_DTYPE, encoding=zlib),
                "sample_index": tfds.features.Scalar(dtype=np.int32),
                "name": tfds.features.Text(),
            }),
            homepage=self.HOMEPAGE,
            disable_shuffling=True)  # keep the official clip order (the first clips are the pictures')

    def _folder_source(self, root: Path):
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        source = self._folder_source(self._manual_root(dl_manager))
        if len(source) == 0:
            raise FileNotFoundError(f"{self.name}: no clips found under {source.root}; "
                                    f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
        return {self.SPLIT: self._generate_examples(source)}

    def _generate_examples(self, source):
        return self._examples(list(range(len(source))), functools.partial(_clip_example, source=source))


class VspwClips(_EvalClipsBuilder):
    """VSPW validation clips (7 frames, 0.2 s apart, ending at every 20th frame) with 124-class masks."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download VSPW (480p) from https://github.com/VSPW-dataset/VSPW-dataset-download and pass the folder
    holding `val.txt` and `data/<video>/origin/*.jpg`, `data/<video>/mask/*.png` as --manual_dir.
    """
    DESCRIPTION = "VSPW validation clips, as the official evaluation samples them."
    HOMEPAGE = "https://www.vspwdataset.com"

    def _folder_source(self, root):
        return eval_sources.VSPWSource(str(root))


class CityscapesSequenceClips(_EvalClipsBuilder):
    """Cityscapes validation sequences: 7-frame clips ending at each annotated (20th) frame."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download leftImg8bit_sequence_trainvaltest.zip and gtFine_trainvaltest.zip from
    https://www.cityscapes-dataset.com (login needed), unzip both into one folder and pass it as --manual_dir:
    `leftImg8bit_sequence/val/<city>/*_leftImg8bit.png` and `gtFine/val/<city>/*_gtFine_labelIds.png`.
    """
    DESCRIPTION = "Cityscapes validation sequence clips, labels (19 train ids) on the last frame."
    HOMEPAGE = "https://www.cityscapes-dataset.com"

    def _folder_source(self, root):
        return eval_sources.CityscapesSource(str(root))


@dataclasses.dataclass(eq=False)
class KittiConfig(tfds.core.BuilderConfig):
    split_file: str = ""  # "" = the Eigen test split shipped with this package


class KittiEigenClips(_EvalClipsBuilder):
    """KITTI Eigen test clips (KB crop) with projected LiDAR depth in metres (0 = invalid)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download the KITTI raw drives of the Eigen test split and the annotated depth maps
    (data_depth_annotated.zip) from https://www.cvlibs.net/datasets/kitti and pass the folder holding
    `<date>/<drive>/image_02/data/*.png` and `{val,train}/<drive>/proj_depth/groundtruth/image_02/*.png`
    as --manual_dir.
    """
    BUILDER_CONFIGS = [KittiConfig(name="eigen", description="the packaged Eigen test split")]
    LABEL_DTYPE = np.float32
    SPLIT = "test"
    DESCRIPTION = "KITTI Eigen test clips with depth, as the official evaluation samples them."
    HOMEPAGE = "https://www.cvlibs.net/datasets/kitti"

    def _folder_source(self, root):
        return eval_sources.KITTISource(str(root), split_file=self.builder_config.split_file)


# config.data.eval.<set> -> (builder name, split) of the TFDS layout (tfds_sources.py).
EVAL_BUILDERS = {"vspw": (VspwClips.name, VspwClips.SPLIT),
                 "cityscapes": (CityscapesSequenceClips.name, CityscapesSequenceClips.SPLIT),
                 "kitti": (KittiEigenClips.name, KittiEigenClips.SPLIT)}
