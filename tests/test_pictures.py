"""Pictures: PCA (vs a torch transcription of the official one), palettes, depth colours, grids, files."""

import av
import jax
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

import deltaworld_jax  # noqa: F401
from deltaworld_jax.models.heads import DepthHead, RGBHead, SegHead
from deltaworld_jax.evaluation import protocol as ev
from deltaworld_jax.evaluation import forecasters
from deltaworld_jax.evaluation import pictures as pic


def _official_pca(tgt_grid, pred_grid):  # training/base.py pca, on [T, C, h, w] tensors
    num_channels, h, w = tgt_grid.shape[1:]
    x = tgt_grid.permute(0, 2, 3, 1).reshape(-1, num_channels).double()
    mu = x.mean(0, keepdim=True)
    xc = x - mu
    cx = (xc.T @ xc) / max(len(xc) - 1, 1)
    cx.diagonal().add_(1e-6)
    wp = torch.linalg.eigh(cx)[1][:, -3:]
    wp[:, wp.sum(0) < 0] *= -1
    y = xc @ wp
    m, d = y.amin(0, keepdim=True), (y.amax(0, keepdim=True) - y.amin(0, keepdim=True)).clamp(min=1e-6)
    proj = lambda f: (((f.double().flatten(1).T - mu) @ wp).view(h, w, 3) - m).div(d).clamp(0, 1).numpy()
    return [proj(t) for t in tgt_grid], [proj(p) for p in pred_grid]


def test_feature_pca_matches_official_and_is_fit_on_truth():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(3, 12, 8)) * np.linspace(3, 0.1, 8)  # distinct variances: a stable basis
    pred = truth[:2] + rng.normal(size=(2, 12, 8)) * 0.3
    ours_t, ours_p = pic.feature_pca(truth, pred, grid_hw=(3, 4))
    to_grid = lambda f: torch.from_numpy(f).transpose(1, 2).reshape(-1, 8, 3, 4)
    ref_t, ref_p = _official_pca(to_grid(truth), to_grid(pred))
    np.testing.assert_allclose(np.stack(ours_t), np.stack(ref_t), atol=1e-5)
    np.testing.assert_allclose(np.stack(ours_p), np.stack(ref_p), atol=1e-5)
    # Truth spans [0, 1] per component; constant truth gives black.
    assert np.stack(ours_t).min() == 0 and np.stack(ours_t).max() == pytest.approx(1)
    black = pic.feature_pca(np.ones((2, 12, 8)), pred, grid_hw=(3, 4))
    assert all((img == 0).all() for imgs in black for img in imgs)


def test_palette_and_depth_colours():
    palette = pic.segmentation_palette()
    expected = np.random.default_rng(seed=0).integers(0, 256, (256, 3), dtype=np.uint8) / 255.0
    np.testing.assert_array_equal(palette[:255], expected[:255])
    assert (palette[255] == 0).all()
    assert pic.colour_segmentation(np.array([[255, 3]])).shape == (1, 2, 3)
    gt, pred = pic.colour_depths([np.zeros((2, 2)), np.full((2, 2), 2.0)], [np.full((2, 2), 4.0)])
    assert gt[0] is None  # no valid pixel
    import matplotlib

    np.testing.assert_allclose(pred[0][0, 0], matplotlib.colormaps["viridis"](1.0)[:3], atol=1e-6)
    np.testing.assert_allclose(gt[1][0, 0], matplotlib.colormaps["viridis"](0.5)[:3], atol=1e-6)


def test_grid_png_and_animations(tmp_path):
    rows = [[np.ones((6, 8, 3)), None], [np.zeros((3, 4, 3)), np.full((6, 8, 3), 0.5)]]
    grid = pic.grid_image(rows, 2)
    assert grid.shape == (12, 16, 3) and grid.dtype == np.uint8
    assert (grid[:6, :8] == 255).all() and (grid[:6, 8:] == 0).all() and (grid[6:, 8:] == 127).all()
    big = pic.grid_image([[np.zeros((512, 1024, 3))]])
    assert big.shape == (128, 256, 3)  # longest cell side capped at 256, as official
    path = pic.write_png(grid, tmp_path / "sub" / "g.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (16, 12)
    frames = [np.full((7, 9, 3), v, np.uint8) for v in (0, 128, 255)]
    gif = pic.write_animation(frames, tmp_path / "a.gif")
    with Image.open(gif) as im:
        assert im.n_frames == 3
    mp4 = pic.write_animation(frames, tmp_path / "a.mp4")
    with av.open(mp4) as c:
        assert len(list(c.decode(video=0))) == 3


def test_futures_picture_layout():
    img = lambda v: np.full((4, 4, 3), v)
    image = pic.futures_picture([img(0.1)] * 2, [img(0.2)] * 3, {"best": [img(1)] * 3, "mean": [img(0.5)] * 3},
                                with_names=False)
    assert image.shape == (12, 20, 3)
    assert (image[4:8, :8] == 0).all() and (image[4:8, 8:] == 255).all()


def test_evaluation_pictures_sizes():
    class Vfm(nnx.Module):
        patch_size = 4

        def __call__(self, frames):
            x = jax.numpy.asarray(frames, jax.numpy.float32) / 255.0
            *lead, h, w, c = x.shape
            x = x.reshape(*lead, h // 4, 4, w // 4, 4, c).swapaxes(-4, -3)
            return x.reshape(*lead, (h // 4) * (w // 4), 48)

    rng = np.random.default_rng(1)
    batch = {"frames": rng.integers(0, 255, (1, 7, 8, 8, 3), dtype=np.uint8),
             "timestamps": np.arange(7, dtype=np.float32)[None] * 0.2,
             "labels": rng.integers(0, 4, (1, 7, 8, 8))}

    class Samples:
        name, criterion = "fake", staticmethod(ev.world_criterion)

        def __call__(self, clip, *, ctx_len, horizon, rng):
            feats, _ = forecasters._window(clip, ctx_len, horizon)
            noise = jax.random.normal(jax.random.key(0), (1, 5, horizon, *feats.shape[2:])) * 0.1
            return ev.Forecast(feats[:, None, ctx_len:] + noise, feats[:, ctx_len:], feats[:, :ctx_len], ctx_len)

    evaluator = ev.Evaluator([Samples()], Vfm(), {}, ev.EvalSettings(horizons=(3,)))
    (output,) = evaluator.update("vspw", batch, jax.random.key(0))
    # Built under jit: eager initialisation compiles every initialiser separately (slow on a shared CPU).
    rgb = nnx.jit(lambda: RGBHead(48, np.ones(48), np.zeros(48), hidden_size=16, depth=1, num_heads=2, mlp_size=16,
                                  patch_size=4, img_size=8, rngs=nnx.Rngs(0)))()
    seg, depth = nnx.jit(lambda: (SegHead(48, 4, rngs=nnx.Rngs(0)), DepthHead(48, rngs=nnx.Rngs(0))))()
    for head, task in [(seg, "seg"), (depth, "depth")]:
        pictures = pic.evaluation_pictures(output, head=head, rgb_head=rgb, max_samples=3)
        assert set(pictures) == {"feats_mean", "feats_best", f"{task}_mean", f"{task}_best", f"samples_{task}",
                                 "rgb_mean", "rgb_best"}
        for name, image in pictures.items():
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3, name
        assert pictures["feats_best"].shape == (3 * 8, 7 * 8, 3)
        assert pictures[f"{task}_mean"].shape == (4 * 8, 7 * 8, 3)
        assert pictures[f"samples_{task}"].shape[0] == 7 * 8  # frames, truth, best, mean, 3 samples
        # The prediction row: empty under the 4 context frames, the 3 predicted frames drawn.
        pred_row = pictures[f"{task}_best"][3 * 8:]
        assert (pred_row[:, :4 * 8] == 0).all() and pred_row[:, 4 * 8:].any(axis=(0, 2)).reshape(3, 8).any(1).all()
