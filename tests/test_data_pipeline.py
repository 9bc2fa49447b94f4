"""Grain loaders end to end on tiny real files: batches, determinism, sharding, resume, skips, workers."""

import os

import numpy as np
import pytest
from PIL import Image
from test_data_fixtures import make_kinetics_tree, make_vspw

from deltaworld_jax.data import default_data_config
from deltaworld_jax.data.pipeline import make_eval_iterator, make_train_iterator

NUM_VIDEOS, FPS = 8, 10.0


@pytest.fixture(scope="module")
def coloured_videos(tmp_path_factory):
    """Frame folders whose every pixel is 20 * video id: a batch tells which videos it came from."""
    root = tmp_path_factory.mktemp("coloured")
    for video in range(NUM_VIDEOS):
        folder = root / f"v{video}"
        folder.mkdir()
        for n in range(12):
            Image.fromarray(np.full((20, 28, 3), 20 * video, np.uint8)).save(folder / f"{n:03d}.png")
    return root


def frames_config(root, **overrides):
    config = default_data_config()
    config.source, config.root, config.fps, config.exclude_list = "frames", str(root), FPS, ""
    config.num_frames, config.frame_size = 4, 16
    config.read_threads = 1
    config.update(overrides)
    return config


def video_ids(batch):
    return [int(round(v)) for v in batch["frames"].reshape(batch["frames"].shape[0], -1).mean(axis=1) / 20]


def take(iterator, n):
    batches = [next(iterator) for _ in range(n)]
    return batches


def test_train_batches_shapes_dtypes_and_timestamps(coloured_videos):
    iterator = make_train_iterator(frames_config(coloured_videos, frame_width=24), seed=0, batch_size_per_process=3)
    for batch in take(iterator, 3):
        assert set(batch) == {"frames", "timestamps"}
        assert batch["frames"].shape == (3, 4, 16, 24, 3) and batch["frames"].dtype == np.uint8
        assert batch["timestamps"].shape == (3, 4) and batch["timestamps"].dtype == np.float32
        times = batch["timestamps"]
        assert np.all(times[:, 0] == 0)
        steps = np.diff(times, axis=1)
        # Frames are 0.1 s apart; targets are 1/25..1/3 s apart and snap to the nearest frame.
        assert np.all(steps >= 0) and np.all(steps <= 0.4 + 1e-6)
        np.testing.assert_allclose(times * FPS, np.round(times * FPS), atol=1e-4)
    assert iterator.errors == {"unreadable": 0, "too_short": 0, "missing_label": 0}


def test_same_seed_same_batches_other_seed_other_batches(coloured_videos):
    config = frames_config(coloured_videos)
    a = take(make_train_iterator(config, seed=5, batch_size_per_process=2), 3)
    b = take(make_train_iterator(config, seed=5, batch_size_per_process=2), 3)
    c = take(make_train_iterator(config, seed=6, batch_size_per_process=2), 3)
    assert all(np.array_equal(x["frames"], y["frames"]) and np.array_equal(x["timestamps"], y["timestamps"])
               for x, y in zip(a, b))
    assert not all(np.array_equal(x["timestamps"], y["timestamps"]) for x, y in zip(a, c))


def test_processes_see_disjoint_videos_and_together_all(coloured_videos):
    config = frames_config(coloured_videos)
    seen = []
    for process in range(2):
        iterator = make_train_iterator(config, seed=1, batch_size_per_process=2, process_index=process,
                                       process_count=2)
        epoch = take(iterator, NUM_VIDEOS // 2 // 2)  # one epoch of this process's 4 videos
        seen.append(sorted(v for batch in epoch for v in video_ids(batch)))
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(NUM_VIDEOS))


def test_global_batches_do_not_depend_on_the_process_count(coloured_videos):
    """Global batch k (the processes' batches k side by side, in process order) is the same clips, in the same
    order, for 1 and 2 processes; an iterator resumed at global step k on another process count continues with
    global batch k (a checkpoint of a 2-process run restored in 1 process replays and skips nothing)."""
    config = frames_config(coloured_videos)
    one = take(make_train_iterator(config, seed=1, batch_size_per_process=4), 5)  # crosses an epoch (8 videos)
    two = [take(make_train_iterator(config, seed=1, batch_size_per_process=2, process_index=p, process_count=2), 5)
           for p in range(2)]
    for k in range(5):
        for key in ("frames", "timestamps"):
            np.testing.assert_array_equal(np.concatenate([two[0][k][key], two[1][k][key]]), one[k][key])
    moved = make_train_iterator(config, seed=1, batch_size_per_process=4)
    assert moved.topology_independent
    moved.set_state(moved.global_state(3, {"too_short": 2}))  # e.g. a 2-process checkpoint at step 3
    np.testing.assert_array_equal(next(moved)["frames"], one[3]["frames"])
    assert moved.errors["too_short"] == 2
    second = make_train_iterator(config, seed=1, batch_size_per_process=2, process_index=1, process_count=2)
    second.set_state(second.global_state(3))  # ... or a 1-process checkpoint restored by 2 processes
    np.testing.assert_array_equal(next(second)["frames"], one[3]["frames"][2:])


def test_iterator_state_restores_the_exact_batch_stream(coloured_videos):
    config = frames_config(coloured_videos)
    iterator = make_train_iterator(config, seed=3, batch_size_per_process=3)
    take(iterator, 2)
    state = iterator.get_state()
    expected = take(iterator, 4)  # crosses an epoch boundary (8 videos, 3 per batch)
    resumed = make_train_iterator(config, seed=3, batch_size_per_process=3)
    resumed.set_state(state)
    for x, y in zip(expected, take(resumed, 4)):
        assert np.array_equal(x["frames"], y["frames"]) and np.array_equal(x["timestamps"], y["timestamps"])


def test_broken_videos_are_skipped_and_counted(tmp_path):
    train = make_kinetics_tree(tmp_path, num_videos=3, num_frames=12)  # + garbage, empty, 1-frame
    good = (train / "class0" / "vid00.mp4").read_bytes()
    (train / "class0" / "truncated.mp4").write_bytes(good[: len(good) // 3])
    config = default_data_config()
    config.source, config.root, config.exclude_list = "videos", str(train), ""
    config.num_frames, config.frame_size, config.read_threads = 2, 16, 1
    iterator = make_train_iterator(config, seed=0, batch_size_per_process=7)
    batch = next(iterator)  # one epoch: every video once
    assert batch["frames"].shape == (7, 2, 16, 16, 3)
    errors = iterator.errors
    assert errors["unreadable"] >= 3 and errors["too_short"] >= 1 and errors["missing_label"] == 0
    state = iterator.get_state()
    assert state["errors"] == errors  # the counts are checkpointed with the stream
    # A source where nothing is readable is an error that names it, not an endless loop.
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"x{i}.mp4").write_bytes(b"junk" * 100)
    config.root = str(broken)
    config.max_retries = 4
    with pytest.raises(RuntimeError, match=f"no readable clip.*{broken}"):
        next(make_train_iterator(config, seed=0, batch_size_per_process=1))
    config.root = str(tmp_path / "nothing_here")
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        make_train_iterator(config, seed=0, batch_size_per_process=1)


def test_worker_processes_give_identical_batches_and_resume_across_worker_counts(coloured_videos):
    config = frames_config(coloured_videos)
    in_process = make_train_iterator(config, seed=2, batch_size_per_process=2, num_workers=0)
    expected = take(in_process, 5)
    no_errors = dict(in_process.errors)
    workers = make_train_iterator(config, seed=2, batch_size_per_process=2, num_workers=2)
    try:
        workers.set_state({"batches": 2, "errors": no_errors})  # a run without workers resumed with two
        first = take(workers, 1)
        state = workers.get_state()
        rest = take(workers, 2)
    finally:
        workers.close()
    for x, y in zip(expected[2:], first + rest):
        assert np.array_equal(x["frames"], y["frames"]) and np.array_equal(x["timestamps"], y["timestamps"])
    in_process.set_state(state)  # ...and a checkpoint of the two-worker run resumed without workers
    assert all(np.array_equal(x["frames"], y["frames"]) for x, y in zip(rest, take(in_process, 2)))


def test_eval_iterator_skips_and_counts_missing_labels(tmp_path):
    root = make_vspw(tmp_path, num_videos=2, num_frames=40)
    os.remove(root / "data" / "video1" / "mask" / "00030.png")  # breaks video1's clip ending at 39
    config = default_data_config()
    config.frame_size, config.read_threads = 16, 1
    config.eval.vspw.root = str(root)
    for process_count in (1, 2):
        clips = []
        errors = {"unreadable": 0, "too_short": 0, "missing_label": 0}
        for process in range(process_count):
            iterator = make_eval_iterator(config, "vspw", process_index=process, process_count=process_count)
            for batch in iterator:
                assert batch["frames"].shape == (2, 7, 16, 16, 3) and batch["labels"].shape == (2, 7, 24, 20)
                clips.extend(batch["sample_index"][batch["crop_index"] == 0].tolist())
            errors = {k: errors[k] + iterator.errors[k] for k in errors}
        assert len(clips) == 3 and len(set(clips)) == 3 and errors["missing_label"] == 1
    for mask in (root / "data").rglob("*.png"):
        mask.unlink()
    with pytest.raises(RuntimeError, match=f"none of this process's clips in '{root}'"):
        list(make_eval_iterator(config, "vspw"))


def test_orbax_grain_checkpoint_handler_round_trip(coloured_videos, tmp_path):
    import grain
    from etils import epath

    config = frames_config(coloured_videos)
    iterator = make_train_iterator(config, seed=4, batch_size_per_process=2)
    take(iterator, 3)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(iterator))
    expected = next(iterator)
    restored = handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(
        make_train_iterator(config, seed=4, batch_size_per_process=2)))
    assert np.array_equal(next(restored)["frames"], expected["frames"])


def test_place_batch_makes_global_arrays_sharded_over_data_axes():
    import jax
    from jax.sharding import Mesh

    from deltaworld_jax.data.placement import place_batch

    devices = np.array(jax.devices()).reshape(-1, 1)
    mesh = Mesh(devices, ("data", "fsdp"))
    batch = {"frames": np.zeros((2 * len(devices), 2, 8, 8, 3), np.uint8),
             "timestamps": np.zeros((2 * len(devices), 2), np.float32)}
    placed = place_batch(batch, mesh, ("data", "fsdp"))
    assert placed["frames"].shape == batch["frames"].shape and placed["frames"].dtype == np.uint8
    assert placed["timestamps"].sharding.spec[0] == ("data", "fsdp")
    with pytest.raises(ValueError, match="not axes of the mesh"):
        place_batch(batch, mesh, "batch")


def test_synthetic_world_through_the_same_loaders():
    config = default_data_config()  # the embedded default source
    config.num_frames, config.frame_size, config.read_threads = 3, 16, 1
    config.eval.num_synthetic_clips = 2
    a = take(make_train_iterator(config, seed=0, batch_size_per_process=2), 2)
    b = take(make_train_iterator(config, seed=0, batch_size_per_process=2), 2)
    assert a[0]["frames"].shape == (2, 3, 16, 16, 3) and a[0]["timestamps"].shape == (2, 3)
    assert all(np.array_equal(x["frames"], y["frames"]) for x, y in zip(a, b))
    assert a[0]["frames"].std() > 0  # shapes on a background, not a blank frame
    batches = list(make_eval_iterator(config, "synthetic"))
    assert [int(batch["sample_index"][0]) for batch in batches] == [0, 1]
    assert batches[0]["frames"].shape == (1, 7, 16, 16, 3)
    np.testing.assert_allclose(batches[0]["timestamps"][0], np.arange(7) * 0.2, atol=1e-6)


def test_synthetic_clips_can_open_with_a_cut():
    """data.synthetic.from_black_probability / cut_probability: those shares of training clips have a black FIRST
    frame (the pair (black, f0) of every clip's token sequence) or another clip's first frame (a scene cut),
    drawn per clip and start, the same in every run; the other frames, and the other clips, are exactly the
    world's. Probabilities outside [0, 1] or summing past 1 are refused."""
    from deltaworld_jax.data.pipeline import make_train_source

    config = default_data_config()
    config.num_frames, config.frame_size, config.read_threads = 2, 16, 1
    plain = make_train_source(config)
    config.synthetic.from_black_probability = 0.25
    config.synthetic.cut_probability = 0.25
    cut = make_train_source(config)
    starts = [(index, first) for index in range(200) for first in (0, 7)]
    openings = [cut.opening(i, f) for i, f in starts]
    assert 0.17 < np.mean([o == -1 for o in openings]) < 0.33  # 400 draws of p = 0.25
    assert 0.17 < np.mean([o is not None and o >= 0 for o in openings]) < 0.33
    assert all(o != i for o, (i, _) in zip(openings, starts))  # a cut comes from ANOTHER clip
    assert openings == [make_train_source(config).opening(i, f) for i, f in starts]
    for (index, first), opening in list(zip(starts, openings))[:16]:
        a = plain.read_frames(index, [first, first + 3], lambda f: f)
        b = cut.read_frames(index, [first, first + 3], lambda f: f)
        assert np.array_equal(a[1], b[1])
        if opening is None:
            assert np.array_equal(a[0], b[0])
        elif opening == -1:
            assert not b[0].any()
        else:
            assert np.array_equal(b[0], plain.read_frames(opening, [first], lambda f: f)[0])
    batch = take(make_train_iterator(config, seed=0, batch_size_per_process=16), 1)[0]["frames"]
    first_black = ~batch[:, 0].reshape(16, -1).any(-1)
    assert first_black.any() and not first_black.all() and batch[:, 1].reshape(16, -1).any(-1).all()
    for black, other in ((1.5, 0.0), (0.0, -0.1), (0.6, 0.6)):
        config.synthetic.from_black_probability, config.synthetic.cut_probability = black, other
        with pytest.raises(ValueError, match="probability"):
            make_train_source(config)


def test_synthetic_eval_frames_are_the_world_rendered_at_eval_size():
    from deltaworld_jax.data.pipeline import make_eval_source

    config = default_data_config()
    config.frame_size = 16
    config.eval.num_synthetic_clips = 1
    source = make_eval_source(config, "synthetic")
    clip = source.load(0)
    # Held out by construction: eval clip 0 is the world clip just past the training source's clips.
    assert source.world_index(0) == config.synthetic.num_clips
    truth = source.world.render(source.world.state_at(config.synthetic.num_clips, 0.6), 16, 16)
    assert np.array_equal(clip["frames"][3], truth)
    assert not np.array_equal(clip["frames"][3], source.world.render(source.world.state_at(0, 0.6), 16, 16))
