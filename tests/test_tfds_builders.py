"""The TFDS builders (data/tfds_builders.py) on tiny sets in the official on-disk layouts: built locally,
with Apache Beam's DirectRunner and with the `tfds build` command line, then read through `tfds.data_source`
by the same Grain pipeline as the other sources, giving what the folder / prepared sources give."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_data_fixtures import frame_number, make_cityscapes, make_kinetics_tree, make_kitti, make_vspw

from deltaworld_jax.data import default_data_config, eval_sources, prepare, tfds_builders, tfds_sources
from deltaworld_jax.data.arrayrecord import ArrayRecordSource
from deltaworld_jax.data.pipeline import TrainClipLoader, make_eval_iterator, make_train_iterator
from deltaworld_jax.data.sampling import clip_rng
from deltaworld_jax.data.tfds_sources import TfdsClipSource, TfdsVideoSource

GOOD_VIDEOS = ["class0/vid00.mp4", "class0/vid02.mp4", "class1/vid01.mp4", "class1/vid03.mp4"]
NUM_BROKEN = 3  # make_kinetics_tree's garbage, empty and one-frame videos


@pytest.fixture(scope="module", autouse=True)
def temporary_folders_under_pytest(tmp_path_factory):
    """Apache Beam (beam-temp*) and TFDS (tmp*tfds) make temporary folders under the system temp folder and
    do not remove them all: for these tests they go to a folder of pytest's, which pytest cleans up. TMPDIR
    too, for the `tfds` command line's subprocess."""
    folder = str(tmp_path_factory.mktemp("tempdir"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", folder)
        patch.setattr(tempfile, "tempdir", folder)
        yield folder


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinetics_manual")
    make_kinetics_tree(root, num_videos=4, num_frames=20)  # root/train/<class>/<id>.mp4 as downloaded
    return root


def build(builder, manual_dir, **download_config):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir), **download_config))
    return builder


@pytest.fixture(scope="module")
def kinetics_tfds(kinetics, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    build(tfds.builder("kinetics700_frames/full", data_dir=str(data_dir)), kinetics)
    return data_dir


def frame_records(source: TfdsVideoSource, index: int) -> list[bytes]:
    first, count = int(source._first[index]), int(source._counts[index])
    return [record["jpeg"] for record in source._data_source().__getitems__(range(first, first + count))]


def test_kinetics_builder_holds_what_prepare_writes_and_skips_broken_videos(kinetics, kinetics_tfds, tmp_path):
    source = TfdsVideoSource("kinetics700_frames/full", str(kinetics_tfds))
    assert source.names == GOOD_VIDEOS  # the 3 broken videos were skipped, not fatal; sorted order
    builder = tfds.builder("kinetics700_frames/full", data_dir=str(kinetics_tfds))
    assert builder.info.file_format.value == "array_record"
    assert builder.info.splits["train"].num_examples == 4 * 20  # one record per frame
    prepare.prepare(str(kinetics / "train"), str(tmp_path / "prepared"), num_shards=2, exclude_list="kinetics")
    prepared = ArrayRecordSource(str(tmp_path / "prepared"))
    for index, name in enumerate(source.names):
        other = prepared.names.index(name)
        np.testing.assert_array_equal(source.frame_timestamps(index), prepared.frame_timestamps(other))
        # One encoder for both layouts: the very same JPEG bytes, frame by frame.
        records = prepared._reader(int(prepared._shard_of[other])).read(
            [int(prepared._first[other]) + i for i in range(20)])
        assert frame_records(source, index) == records
        for reader in TfdsVideoSource.READERS:  # the direct ArrayRecord reader and tfds.data_source agree
            frames = TfdsVideoSource("kinetics700_frames/full", str(kinetics_tfds), reader=reader).read_frames(
                index, [19, 4, 4], lambda image: np.asarray(image.convert("RGB")))
            assert [frame_number(f) for f in frames] == [19, 4, 4]


def test_tfds_source_gives_the_clips_of_the_prepared_source(kinetics, kinetics_tfds, tmp_path):
    prepare.prepare(str(kinetics / "train"), str(tmp_path / "prepared"), num_shards=1, exclude_list="kinetics")
    prepared = ArrayRecordSource(str(tmp_path / "prepared"))
    source = TfdsVideoSource("kinetics700_frames/full", str(kinetics_tfds))
    config = default_data_config()
    config.num_frames, config.frame_size = 3, 16
    load = TrainClipLoader(source, config, seed=0, shard=range(len(source)))
    load_prepared = TrainClipLoader(prepared, config, seed=0, shard=range(len(prepared)))
    for index, name in enumerate(source.names):
        ours = load.load_clip(index, clip_rng(7, index))
        theirs = load_prepared.load_clip(prepared.names.index(name), clip_rng(7, index))
        np.testing.assert_array_equal(ours["frames"], theirs["frames"])
        np.testing.assert_array_equal(ours["timestamps"], theirs["timestamps"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_grain_pipeline_reads_the_tfds_layout(kinetics_tfds, num_workers):
    config = default_data_config()
    config.source, config.root, config.tfds_name = "tfds", str(kinetics_tfds), "kinetics700_frames/full"
    config.num_frames, config.frame_size, config.crop_scale, config.horizontal_flip = 2, 32, (1.0, 1.0), False
    config.ratio_jitter = 1.0
    iterator = make_train_iterator(config, seed=0, batch_size_per_process=4, num_workers=num_workers)
    batch = next(iterator)
    assert batch["frames"].shape == (4, 2, 32, 32, 3) and batch["frames"].dtype == np.uint8
    for frames, times in zip(batch["frames"], batch["timestamps"]):  # 10 fps; times count from the clip's start
        first, second = (frame_number(f) for f in frames)
        assert second - first == round(10 * (times[1] - times[0])) > 0
    assert iterator.errors == {"unreadable": 0, "too_short": 0, "missing_label": 0}
    if hasattr(iterator, "close"):
        iterator.close()


def test_beam_direct_runner_builds_the_same_dataset(kinetics, kinetics_tfds, tmp_path):
    beam = pytest.importorskip("apache_beam")  # the `beam` extra
    options = beam.options.pipeline_options.PipelineOptions(["--runner=DirectRunner"])
    build(tfds.builder("kinetics700_frames/full", data_dir=str(tmp_path)), kinetics, beam_options=options)
    by_beam = TfdsVideoSource("kinetics700_frames/full", str(tmp_path))
    local = TfdsVideoSource("kinetics700_frames/full", str(kinetics_tfds))
    assert by_beam.names == local.names == GOOD_VIDEOS
    for index in range(len(local)):
        assert frame_records(by_beam, index) == frame_records(local, index)
        np.testing.assert_array_equal(by_beam.frame_timestamps(index), local.frame_timestamps(index))

    # Broken videos are counted in the pipeline's metrics.
    builder = tfds_builders.Kinetics700Frames(config="full", data_dir=str(tmp_path / "pipeline"))
    builder._with_beam = True
    builder.data_path.mkdir(parents=True)
    inputs = [(i, name, str(kinetics / "train" / name)) for i, name in enumerate(["class0/garbage.mp4",
                                                                                  "class1/vid01.mp4"])]
    pipeline = beam.Pipeline(options=options)
    _ = pipeline | builder._generate_examples(inputs)
    result = pipeline.run()
    result.wait_until_finish()
    counters = result.metrics().query(beam.metrics.MetricsFilter().with_name(tfds_builders.SKIPPED_COUNTER[1]))
    assert [c.committed for c in counters["counters"]] == [1]
    index = tfds_sources.read_video_index(builder.data_path)  # written by the pipeline's index branch
    assert index["names"].tolist() == ["class1/vid01.mp4"] and index["video"].tolist() == [1]


# The `tfds` console script of tensorflow-datasets 4.9.10 imports apache_beam (its convert_format subcommand)
# and `mlcroissant` (its croissant subcommand) before any command runs: the `beam` extra installs both. Where
# mlcroissant is missing, a stand-in module lets the real `build` command run.
TFDS_CLI = """
import importlib.util, sys, types
if importlib.util.find_spec("mlcroissant") is None:
    sys.modules["mlcroissant"] = types.SimpleNamespace(Dataset=object)
from tensorflow_datasets.scripts.cli.main import launch_cli
sys.argv[0] = "tfds"
launch_cli()
"""


def test_tfds_build_command_line(kinetics, tmp_path):
    pytest.importorskip("apache_beam")  # the `beam` extra: the tfds command imports it
    command = [sys.executable, "-c", TFDS_CLI, "build", "kinetics700_frames/full",
               "--imports=deltaworld_jax.data.tfds_builders", f"--manual_dir={kinetics}", f"--data_dir={tmp_path}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert TfdsVideoSource("kinetics700_frames/full", str(tmp_path)).names == GOOD_VIDEOS
    assert list(tmp_path.glob("kinetics700_frames/full/1.0.0/*.array_record-*"))


def test_missing_manual_dir_says_where_to_download(tmp_path):
    builder = tfds.builder("vspw_clips", data_dir=str(tmp_path))
    with pytest.raises(Exception, match="VSPW"):
        build(builder, tmp_path / "nowhere")


def assert_same_batches(ours, theirs):
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("name", ["vspw", "cityscapes", "kitti"])
def test_eval_sets_through_tfds_equal_the_folder_sources(tmp_path, name):
    config = default_data_config()
    config.eval.frame_size = 16
    root = tmp_path / name
    builder_name = tfds_builders.EVAL_BUILDERS[name][0]
    if name == "vspw":
        make_vspw(root)
        builder = tfds.builder(builder_name, data_dir=str(tmp_path / "tfds"))
    elif name == "cityscapes":
        make_cityscapes(root)
        builder = tfds.builder(builder_name, data_dir=str(tmp_path / "tfds"))
    else:
        root, split = make_kitti(root)
        config.eval.kitti.split_file = str(split)
        builder = tfds_builders.KittiEigenClips(config=tfds_builders.KittiConfig(name="fixture", split_file=str(split)),
                                                data_dir=str(tmp_path / "tfds"))
        config.eval.kitti.tfds_name = "kitti_eigen_clips/fixture"
    build(builder, root)
    config.eval[name].root = str(root)
    folder = list(make_eval_iterator(config, name))
    config.eval[name].source, config.eval[name].root = "tfds", str(tmp_path / "tfds")
    through_tfds = list(make_eval_iterator(config, name))
    assert_same_batches(through_tfds, folder)
    source = TfdsClipSource(config.eval[name].tfds_name or builder_name, str(tmp_path / "tfds"),
                            tfds_builders.EVAL_BUILDERS[name][1])
    assert len(source) == len(folder)


def test_eval_clip_order_is_the_official_one(tmp_path):
    make_vspw(tmp_path / "vspw", num_videos=3)
    build(tfds.builder("vspw_clips", data_dir=str(tmp_path / "tfds")), tmp_path / "vspw")
    official = eval_sources.VSPWSource(str(tmp_path / "vspw"))  # shuffled with random.Random(0), as upstream
    data_source = tfds.data_source("vspw_clips", data_dir=str(tmp_path / "tfds"), split="validation")
    assert [data_source[i]["name"].decode() for i in range(len(data_source))] == \
        [official.describe(i) for i in range(len(official))]


def test_unprepared_tfds_source_names_the_build_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build --imports=deltaworld_jax.data.tfds_builders"):
        TfdsVideoSource("kinetics700_frames/full", str(tmp_path))


def test_a_build_whose_index_does_not_match_its_records_is_refused(kinetics_tfds, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(kinetics_tfds, copy)
    version_dir = next(copy.glob("kinetics700_frames/full/*/"))
    index = dict(np.load(version_dir / "videos-00000.npz"))
    index["num_frames"] = index["num_frames"] - 1
    np.savez(version_dir / "videos-00000.npz", **index)
    with pytest.raises(ValueError, match="unfinished or mixed build"):
        TfdsVideoSource("kinetics700_frames/full", str(copy))
    for index_file in version_dir.glob("videos-*.npz"):
        index_file.unlink()
    with pytest.raises(FileNotFoundError, match="no per-video index"):
        TfdsVideoSource("kinetics700_frames/full", str(copy))


def test_trainer_checks_the_tfds_root_before_building(tmp_path):
    from deltaworld_jax.training.trainer import validate_data

    config = ml_collections.ConfigDict({"data": default_data_config()})
    config.data.source, config.data.root = "tfds", str(tmp_path / "missing")
    with pytest.raises(ValueError, match="TFDS data_dir"):
        validate_data(config)
