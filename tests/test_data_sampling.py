"""Clip sampling, augmentation, resizing, square crops and the synthetic world (pure numpy, fast)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from deltaworld_jax.data.pipeline import split_into_square_crops
from deltaworld_jax.data.sampling import (TrainFrameTransform, clip_rng, eval_resize_hw, random_resized_crop_box,
                                          resize_bilinear_like_cv2, sample_train_frame_indices)
from deltaworld_jax.data.synthetic import SyntheticWorld, SyntheticWorldConfig


def test_train_sampling_strides_and_relative_timestamps():
    fps = 25.0
    video_times = np.arange(250) / fps  # a 10 s clip
    for seed in range(50):
        indices, times = sample_train_frame_indices(video_times, 8, (1 / 25, 1 / 3), clip_rng(seed))
        assert times.dtype == np.float32 and times[0] == 0.0
        np.testing.assert_allclose(times, video_times[indices] - video_times[indices[0]], atol=1e-6)
        steps = np.diff(times)
        # Nearest-frame rounding moves each target by at most half a frame.
        assert steps.min() >= 1 / 25 - 1 / fps - 1e-6 and steps.max() <= 1 / 3 + 1 / fps + 1e-6
    a = sample_train_frame_indices(video_times, 8, (1 / 25, 1 / 3), clip_rng(3, 1))
    b = sample_train_frame_indices(video_times, 8, (1 / 25, 1 / 3), clip_rng(3, 1))
    c = sample_train_frame_indices(video_times, 8, (1 / 25, 1 / 3), clip_rng(3, 2))
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])


def test_short_video_repeats_last_frame_like_official():
    indices, times = sample_train_frame_indices(np.arange(5) / 25.0, 8, (0.3, 0.3), clip_rng(0))
    assert indices[0] == 0 and indices[-1] == 4 and np.all(np.diff(indices) >= 0)


def test_random_resized_crop_box_ranges():
    rng = clip_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(240, 320, (0.6, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 240 and 0 <= left and left + w <= 320
        assert 0.6 - 0.02 <= h * w / (240 * 320) <= 1.0
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    # An input far wider than any allowed ratio falls back to the widest centred crop.
    assert random_resized_crop_box(10, 200, (0.99, 1.0), (3 / 4, 4 / 3), rng) == (0, 93, 10, 13)


def _jpeg_image(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_transform_same_crop_for_all_frames_and_draft_decode_matches_full_decode():
    yy, xx = np.mgrid[0:256, 0:320]
    smooth = np.stack([yy % 256, xx % 256, (yy + xx) % 256], -1).astype(np.uint8)
    transform = TrainFrameTransform((32, 32), (0.6, 1.0), 4 / 3, True, clip_rng(1))
    first = transform(_jpeg_image(smooth))
    again = transform(_jpeg_image(smooth))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8 and np.array_equal(first, again)
    # The JPEG path decodes at 1/8 size here (32 px out of >= 150 px crops); it must agree with a full
    # decode up to resampling differences.
    full = TrainFrameTransform((32, 32), (0.6, 1.0), 4 / 3, True, clip_rng(1))(np.asarray(_jpeg_image(smooth)))
    assert np.abs(first.astype(int) - full.astype(int)).mean() < 6
    image = _jpeg_image(smooth)
    TrainFrameTransform((32, 32), (0.6, 1.0), 4 / 3, False, clip_rng(1))(image)
    assert image.size[0] < 320  # draft mode really reduced the decode
    with pytest.raises(ValueError, match="differs"):
        transform(np.zeros((10, 10, 3), np.uint8))


def test_flip_is_drawn_per_clip():
    frame = np.tile(np.arange(64, dtype=np.uint8)[None, :, None], (64, 1, 3))
    flips = []
    for seed in range(20):
        out = TrainFrameTransform((16, 16), (1.0, 1.0), 1.0, True, clip_rng(seed))(frame)
        flips.append(out[0, 0, 0] > out[0, -1, 0])
    assert 0 < sum(flips) < 20


def test_cv2_like_resize_matches_half_pixel_bilinear():
    image = np.random.default_rng(0).integers(0, 256, (20, 36, 3), dtype=np.uint8)
    for out_h, out_w in [(10, 18), (13, 7), (40, 50)]:
        ours = resize_bilinear_like_cv2(image, out_h, out_w).astype(int)
        reference = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].double(),
                                                    (out_h, out_w), mode="bilinear", align_corners=False)
        reference = reference[0].permute(1, 2, 0).round().numpy().astype(int)
        assert np.abs(ours - reference).max() <= 1


def test_eval_resize_sizes_follow_official_rules():
    assert eval_resize_hw(352, 1216, 256) == (256, 512)  # KITTI: long side capped at 2x
    assert eval_resize_hw(1024, 2048, 512) == (512, 1024)  # Cityscapes
    assert eval_resize_hw(720, 1280, 256) == (256, 455)  # VSPW 16:9
    assert eval_resize_hw(720, 1280, (224, 320)) == (224, 320)


def test_square_crops_split_frames_overlapping_and_labels_in_halves():
    frames = np.arange(1 * 2 * 4 * 7 * 3, dtype=np.uint8).reshape(1, 2, 4, 7, 3)
    labels = np.arange(1 * 2 * 3 * 9, dtype=np.uint8).reshape(1, 2, 3, 9)
    batch = {"frames": frames, "labels": labels, "timestamps": np.zeros((1, 2), np.float32),
             "sample_index": np.array([5], np.int32)}
    out = split_into_square_crops(batch)
    assert out["frames"].shape == (2, 2, 4, 4, 3)
    assert np.array_equal(out["frames"][0], frames[0, :, :, :4]) and np.array_equal(out["frames"][1], frames[0, :, :, 3:])
    # Odd label width 9: first half 4 columns + one ignore column, second half 5 columns.
    assert np.array_equal(out["labels"][0, ..., :4], labels[0, ..., :4]) and np.all(out["labels"][0, ..., 4] == 255)
    assert np.array_equal(out["labels"][1], labels[0, ..., 4:])
    assert out["is_wide"].all() and out["overlap"].all() and list(out["crop_index"]) == [0, 1]
    assert list(out["sample_index"]) == [5, 5]
    square = split_into_square_crops({"frames": np.zeros((3, 2, 8, 8, 3), np.uint8)})
    assert square["frames"].shape[0] == 3 and not square["is_split"].any()


def test_synthetic_world_is_deterministic_per_seed_and_index():
    world = SyntheticWorld(SyntheticWorldConfig(), seed=7)
    a = [world.render(s, 24, 40) for s in world.states_at(3, [0.0, 0.5, 2.0])]
    b = [world.render(s, 24, 40) for s in SyntheticWorld(SyntheticWorldConfig(), seed=7).states_at(3, [2.0, 0.5, 0.0])[::-1]]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (24, 40, 3) and a[0].dtype == np.uint8
    other_seed = world.render(SyntheticWorld(SyntheticWorldConfig(), seed=8).state_at(3, 0.5), 24, 40)
    other_clip = world.render(world.state_at(4, 0.5), 24, 40)
    assert not np.array_equal(a[1], other_seed) and not np.array_equal(a[1], other_clip)
    # Shapes stay inside the walls however long they bounce.
    state = world.state_at(3, 60.0)
    active = state.active
    assert np.all(state.position[active] >= state.radius[active, None] - 1e-9)
    assert np.all(state.position[active, 1] <= 1 - state.radius[active] + 1e-9)


def test_synthetic_futures_branch_only_through_events():
    stochastic = SyntheticWorld(SyntheticWorldConfig(event_rate=3.0), seed=0)
    state = stochastic.state_at(0, 1.0)
    _, frames = stochastic.sample_futures(state, 4, [0.5, 1.0, 2.0], seed=1, height=32, width=32)
    assert frames.shape == (4, 3, 32, 32, 3)
    differs = [not np.array_equal(frames[0, -1], frames[k, -1]) for k in range(1, 4)]
    assert any(differs)
    _, again = stochastic.sample_futures(state, 4, [0.5, 1.0, 2.0], seed=1, height=32, width=32)
    assert np.array_equal(frames, again)  # the futures themselves are reproducible
    deterministic = SyntheticWorld(SyntheticWorldConfig(event_rate=0.0), seed=0)
    _, frames = deterministic.sample_futures(deterministic.state_at(0, 1.0), 3, [0.5, 2.0], height=32, width=32)
    assert all(np.array_equal(frames[0], frames[k]) for k in range(3))
    # A future sampled from the clip's own state agrees with the clip up to the first new event.
    truth = deterministic.render(deterministic.state_at(0, 3.0), 32, 32)
    assert np.array_equal(frames[0, -1], truth)
