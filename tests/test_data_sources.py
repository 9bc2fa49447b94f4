"""Sources on real tiny files: PyAV videos, frame folders, the prepare command + ArrayRecord, eval sets."""

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from test_data_fixtures import (frame_number, make_cityscapes, make_kinetics_tree, make_kitti, make_vspw, write_frames,
                                write_mp4)

from deltaworld_jax.data import arrayrecord, eval_sources, prepare
from deltaworld_jax.data.arrayrecord import ArrayRecordSource
from deltaworld_jax.data.sources import BrokenInput, FrameFolderSource, VideoFileSource, read_exclusion_keys

IDENTITY = np.asarray


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinetics")
    train = make_kinetics_tree(root, num_videos=4, num_frames=20)
    good = train / "class0" / "vid00.mp4"
    data = good.read_bytes()
    (train / "class0" / "truncated.mp4").write_bytes(data[: len(data) // 3])
    return train


def test_video_source_reads_exact_frames_by_timestamp_across_keyframes(kinetics):
    source = VideoFileSource(str(kinetics), exclude_list="")
    index = source.paths.index(str(kinetics / "class0" / "vid00.mp4"))
    np.testing.assert_allclose(source.frame_timestamps(index), np.arange(20) / 10)
    wanted = [17, 2, 3, 9, 9, 19, 0]  # unsorted, repeated, spanning several 4-frame GOPs
    frames = source.read_frames(index, wanted, IDENTITY)
    assert [frame_number(f) for f in frames] == wanted
    assert frames[0].shape == (32, 32, 3) and frames[0].dtype == np.uint8


def test_video_source_decodes_only_from_the_keyframe_before_each_needed_frame(tmp_path, monkeypatch):
    write_mp4(tmp_path / "c" / "long.mp4", 60, gop=10)
    source = VideoFileSource(str(tmp_path), exclude_list="")
    _, keyframes, _ = source._frame_index(0)
    assert len(keyframes) == 6  # real 10-frame GOPs, so seeking matters
    decoded = []
    real_open = av.open

    class CountingContainer:
        def __init__(self, container):
            self.container = container

        def __getattr__(self, name):
            return getattr(self.container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.container.close()

        def decode(self, *args, **kwargs):
            for frame in self.container.decode(*args, **kwargs):
                decoded.append(frame.pts)
                yield frame

    monkeypatch.setattr(av, "open", lambda *args, **kwargs: CountingContainer(real_open(*args, **kwargs)))
    frames = source.read_frames(0, [17, 33], IDENTITY)
    assert [frame_number(f) for f in frames] == [17, 33]
    assert len(decoded) == (17 - 10 + 1) + (33 - 30 + 1)  # GOP 10..17, then a seek to 30..33


@pytest.mark.parametrize("name, kind", [("garbage", "unreadable"), ("empty", "unreadable"), ("short", "too_short"),
                                        ("truncated", "unreadable")])
def test_broken_videos_raise_broken_input(kinetics, name, kind):
    source = VideoFileSource(str(kinetics), exclude_list="")
    index = next(i for i, p in enumerate(source.paths) if Path(p).stem == name)
    with pytest.raises(BrokenInput) as caught:
        times = source.frame_timestamps(index)
        source.read_frames(index, [len(times) - 1], IDENTITY)
    assert caught.value.kind == kind and name in caught.value.path


def test_exclusion_lists(kinetics, tmp_path):
    assert "abseiling/dvEr9R6qkuQ_000026_000036" in read_exclusion_keys("kinetics")
    listing = tmp_path / "exclude.txt"
    listing.write_text("class0/vid00.mp4\nclass1/vid01\n")
    kept = VideoFileSource(str(kinetics), exclude_list=str(listing)).paths
    assert not any(p.endswith(("vid00.mp4", "vid01.mp4")) for p in kept)
    assert any(p.endswith("vid02.mp4") for p in kept)


def test_frame_folder_source(tmp_path):
    write_frames(tmp_path / "a" / "v1", 6, ext=".jpg")
    write_frames(tmp_path / "b" / "v2", 5, ext=".png")
    (tmp_path / "b" / "v2" / "00003.png").write_bytes(b"not an image")
    named = tmp_path / "c" / "v3"
    for path, seconds in zip(write_frames(named, 3), (0.5, 0.54, 0.62)):
        path.rename(named / f"{path.stem}_{seconds}.jpg")
    source = FrameFolderSource(str(tmp_path), fps=5.0)
    assert len(source) == 3
    np.testing.assert_allclose(source.frame_timestamps(0), np.arange(6) / 5)
    assert [frame_number(f) for f in source.read_frames(0, [4, 1], IDENTITY)] == [4, 1]
    with pytest.raises(BrokenInput, match="unreadable"):
        source.read_frames(1, [3], lambda image: np.asarray(image.convert("RGB")))
    official_names = FrameFolderSource(str(tmp_path / "c"), fps=0.0)
    np.testing.assert_allclose(official_names.frame_timestamps(0), [0.0, 0.04, 0.12])


def test_prepare_parallel_shards_resume_and_arrayrecord_reads(kinetics, tmp_path, monkeypatch):
    output = tmp_path / "prepared"
    counts = prepare.prepare(str(kinetics), str(output), num_shards=3, num_workers=2, exclude_list="")
    assert counts == {"written": 3, "skipped": 0, "inputs": 8, "ignored": 0, "unreadable": 4}
    source = ArrayRecordSource(str(output))
    assert sorted(source.names) == ["class0/vid00.mp4", "class0/vid02.mp4", "class1/vid01.mp4", "class1/vid03.mp4"]
    index = source.names.index("class1/vid01.mp4")
    np.testing.assert_allclose(source.frame_timestamps(index), np.arange(20) / 10)
    frames = source.read_frames(index, [19, 4, 4], lambda image: np.asarray(image.convert("RGB")))
    assert [frame_number(f) for f in frames] == [19, 4, 4]
    skipped = sum(int(np.load(p)["skipped"]) for p in output.glob("*.index.npz"))
    assert skipped == 4  # garbage, empty, short, truncated

    # Resume: a lost shard (and a stale temp file from a killed run) is redone, finished ones are kept.
    lost = sorted(output.glob("*.index.npz"))[1]
    kept_mtime = sorted(output.glob("*.index.npz"))[0].stat().st_mtime_ns
    lost.unlink()
    (output / ".frames-00001-of-00003.array_record.tmp-999").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match="unfinished shards"):
        ArrayRecordSource(str(output))
    # The command line, one shard at a time (as a cluster job would run it).
    command = [sys.executable, "-m", "deltaworld_jax.data.prepare", f"--input={kinetics}", f"--output={output}",
               "--num_shards=3", "--exclude_list="]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(command + ["--shard_index=1"], capture_output=True, text=True, env=env,
                            cwd=Path(__file__).parents[1], timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "shard 1: written" in result.stdout
    assert not list(output.glob(".*tmp*"))  # the interrupted run's temp file is gone
    assert prepare.write_shard(str(kinetics), str(output), num_shards=3, shard_index=0, exclude_list="") == "skipped"
    assert sorted(output.glob("*.index.npz"))[0].stat().st_mtime_ns == kept_mtime
    assert len(ArrayRecordSource(str(output))) == 4
    # Reading across shards with at most one open reader (the cap on open files) still finds every frame.
    monkeypatch.setattr(arrayrecord, "MAX_OPEN_SHARDS", 1)
    capped = ArrayRecordSource(str(output))
    for video in range(len(capped)):
        frames = capped.read_frames(video, [0, 19], lambda image: np.asarray(image.convert("RGB")))
        assert [frame_number(f) for f in frames] == [0, 19]
    assert len(capped._readers) == 1
    with pytest.raises(ValueError, match="prepared with 3 shards"):
        prepare.write_shard(str(kinetics), str(output), num_shards=4, shard_index=0, exclude_list="")


def test_vspw_source_labels_align_with_frames(tmp_path):
    source = eval_sources.VSPWSource(str(make_vspw(tmp_path, num_videos=1, num_frames=40)))
    assert len(source) == 2  # clips end at frames 19 and 39
    clip = source.load([i for i in range(2) if source.samples[i][1][-1] == 39][0])
    assert [frame_number(f) for f in clip["frames"]] == list(range(21, 40, 3))
    np.testing.assert_allclose(clip["timestamps"], np.arange(7) * 0.2, atol=1e-6)
    # mask value (n % 120) + 1 -> class n; mask 0 -> 255 (ignore)
    assert [int(label[1, 1]) for label in clip["labels"]] == list(range(21, 40, 3))
    assert np.all(clip["labels"][:, 0, 0] == 255) and clip["labels"].dtype == np.uint8
    os.remove(source.samples[0][2][3])
    with pytest.raises(BrokenInput, match="missing_label"):
        source.load(0)


def test_cityscapes_source_label_on_last_frame(tmp_path):
    root = make_cityscapes(tmp_path)
    source = eval_sources.CityscapesSource(str(root))
    clip = source.load(0)
    assert [frame_number(f) for f in clip["frames"]] == list(range(1, 20, 3))
    np.testing.assert_allclose(clip["timestamps"], np.arange(7) * 0.1875)
    assert np.all(clip["labels"][:-1] == 255)
    last = clip["labels"][-1]
    assert last[5, 20] == 0 and last[5, 2] == 13 and last[0, 0] == 255  # road, car, unmapped id
    os.remove(source.samples[1][0][2])  # a missing context frame
    with pytest.raises(BrokenInput, match="unreadable"):
        source.load(1)


def test_kitti_source_kb_crop_and_garg_mask(tmp_path):
    root, split = make_kitti(tmp_path, frames=(30,))
    source = eval_sources.KITTISource(str(root), split_file=str(split))
    assert len(source) == 1  # the 'None' entry and frames < 19 are skipped
    clip = source.load(0)
    assert clip["frames"].shape == (7, 352, 1216, 3) and clip["labels"].shape == (7, 352, 1216)
    assert [frame_number(f) for f in clip["frames"]] == list(range(18, 31, 2))
    depth = clip["labels"][-1]
    assert depth.dtype == np.float32 and depth[200, 600] == pytest.approx(4.0)  # 256 * 4 / 256 m
    assert depth[10, 600] == 0 and depth[200, 10] == 0  # outside the Garg crop = invalid
    packaged = eval_sources.KITTISource(str(root))  # the packaged Eigen split: only drive 0002 has depth here
    assert len(packaged) > 0 and all("drive_0002_sync" in str(s[0][0]) for s in packaged.samples)


def test_prepare_from_frame_folders_copies_jpegs_and_reencodes_pngs(tmp_path):
    jpeg_paths = write_frames(tmp_path / "in" / "a", 4, ext=".jpg")
    write_frames(tmp_path / "in" / "b", 3, ext=".png")
    (tmp_path / "in" / "c").mkdir()
    (tmp_path / "in" / "c" / "00000.jpg").write_bytes(b"broken")
    (tmp_path / "in" / "c" / "00001.jpg").write_bytes(b"broken")
    write_frames(tmp_path / "in" / "d", 1)  # too short
    counts = prepare.prepare(str(tmp_path / "in"), str(tmp_path / "out"), num_shards=1, input_kind="frames",
                             fps=5.0, exclude_list="")
    assert counts == {"written": 1, "skipped": 0, "inputs": 4, "ignored": 0, "unreadable": 2}
    source = ArrayRecordSource(str(tmp_path / "out"))
    assert source.names == ["a", "b"]  # the broken and the 1-frame folders are skipped...
    assert int(np.load(tmp_path / "out" / "frames-00000-of-00001.index.npz")["skipped"]) == 2  # ...and counted
    np.testing.assert_allclose(source.frame_timestamps(1), np.arange(3) / 5)
    records = source._reader(0).read([0, 3])
    assert records[0] == jpeg_paths[0].read_bytes() and records[1] == jpeg_paths[3].read_bytes()  # copied as is
    frames = source.read_frames(1, [2, 0], lambda image: np.asarray(image.convert("RGB")))
    assert [frame_number(f) for f in frames] == [2, 0]
