"""Pictures: feature PCA, segmentation and depth colouring, RGB decodes, and grids of forecasts.

Every picture is built from rows of float images in [0, 1] ([h, w, 3] numpy, or None for an empty cell) by
`grid_image(rows, num_cols)` (the official create_plot_from_rows: cells as large as the largest image, shrunk
so the longest side is at most 256, others resized bilinearly), returned as a uint8 [H, W, 3] array, the
form clu's `writer.write_images` takes (add a leading batch axis) and `write_png` saves.

Official conventions reproduced: the PCA projection is FIT ON THE TRUE features (context + true future)
and shared by the predictions; the segmentation palette is numpy default_rng(0) colours with label 255
black; depth uses viridis scaled by the largest depth among the pictures shown.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
from flax import nnx
from PIL import Image

from deltaworld_jax.models.heads import SegHead, on_patch_grid

# ----------------------------------------------------------------------------------------------------
# Colourings
# ----------------------------------------------------------------------------------------------------


def feature_pca(truth: np.ndarray, *others: np.ndarray, grid_hw: tuple[int, int]) -> list[list[np.ndarray]]:
    """Project features [T_i, N, D] to RGB with the top-3 principal components of `truth`.

    Returns one list of [h, w, 3] images in [0, 1] per input (truth first). As the official `pca`:
    NaNs -> 0, covariance + 1e-6 I, components ordered as eigh returns them (the largest is blue), each
    component's sign chosen so its loadings sum to >= 0, and scaled by the truth's min/max per component;
    constant truth gives black images."""
    h, w = grid_hw
    arrays = [np.nan_to_num(np.asarray(a, np.float64)) for a in (truth, *others)]
    for a in arrays:
        if a.ndim != 3 or a.shape[1] != h * w:
            raise ValueError(f"features must be [T, {h * w}, D] for grid {grid_hw}, got {a.shape}")
    x = arrays[0].reshape(-1, arrays[0].shape[-1])
    if x.std() < 1e-8:
        return [[np.zeros((h, w, 3), np.float32) for _ in a] for a in arrays]
    mean = x.mean(0, keepdims=True)
    centred = x - mean
    cov = centred.T @ centred / max(len(centred) - 1, 1) + 1e-6 * np.eye(x.shape[1])
    components = np.linalg.eigh(cov)[1][:, -3:]
    components[:, components.sum(0) < 0] *= -1
    projected = centred @ components
    low, span = projected.min(0), np.maximum(projected.max(0) - projected.min(0), 1e-6)

    def project(frame: np.ndarray) -> np.ndarray:
        y = ((frame - mean) @ components - low) / span
        return np.clip(y, 0, 1).reshape(h, w, 3).astype(np.float32)

    return [[project(frame) for frame in a] for a in arrays]


def segmentation_palette() -> np.ndarray:
    """[256, 3] colours in [0, 1]: the official seeded palette, label 255 (ignore) black."""
    palette = np.random.default_rng(seed=0).integers(0, 256, (256, 3), dtype=np.uint8) / 255.0
    palette[255] = 0
    return palette


def colour_segmentation(class_ids: np.ndarray) -> np.ndarray:
    """Integer class ids [..., h, w] -> colours [..., h, w, 3] in [0, 1]."""
    return segmentation_palette()[np.asarray(class_ids).astype(np.int64) % 256]


# viridis sampled at 17 points (used when matplotlib is not installed; the pictures then differ slightly).
_VIRIDIS_17 = np.array([
    [68, 1, 84], [72, 24, 106], [71, 45, 123], [66, 64, 134], [59, 82, 139], [51, 99, 141], [44, 114, 142],
    [38, 130, 142], [33, 145, 140], [31, 160, 136], [40, 174, 128], [63, 188, 115], [94, 201, 98],
    [132, 212, 75], [173, 220, 48], [216, 226, 25], [253, 231, 37]], np.float64) / 255.0


def viridis(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] -> [..., 3] viridis colours (matplotlib's table when installed)."""
    values = np.clip(np.nan_to_num(np.asarray(values, np.float64)), 0, 1)
    try:
        import matplotlib

        return matplotlib.colormaps["viridis"](values)[..., :3]
    except ImportError:
        position = values * (len(_VIRIDIS_17) - 1)
        low = np.floor(position).astype(int).clip(0, len(_VIRIDIS_17) - 2)
        frac = (position - low)[..., None]
        return _VIRIDIS_17[low] * (1 - frac) + _VIRIDIS_17[low + 1] * frac


def colour_depths(*depth_sets: Sequence[np.ndarray | None]) -> list[list[np.ndarray | None]]:
    """Colour several lists of depth maps [h, w] with ONE scale: viridis(d / max over everything shown)
    (the official vis_depth). Ground-truth maps without any valid (> 0) pixel become None."""
    maxima = [float(np.max(d)) for s in depth_sets for d in s if d is not None and np.size(d)]
    vmax = max(maxima + [1e-6])
    return [[None if d is None or not (np.asarray(d) > 0).any() else viridis(np.asarray(d) / vmax).astype(np.float32)
             for d in s] for s in depth_sets]


def rgb_image(pixels: np.ndarray) -> np.ndarray:
    """An RGB head output or frame already in [0, 1] scale -> clipped float image."""
    return np.clip(np.asarray(pixels, np.float32), 0, 1)


def frame_image(frame: np.ndarray) -> np.ndarray:
    """uint8 frame [h, w, 3] -> float image in [0, 1]."""
    return np.asarray(frame, np.float32) / 255.0


# ----------------------------------------------------------------------------------------------------
# Grids and files
# ----------------------------------------------------------------------------------------------------


def grid_image(rows: Sequence[Sequence[np.ndarray | None]], num_cols: int | None = None,
               max_cell: int = 256) -> np.ndarray:
    """uint8 [H, W, 3] grid (the official create_plot_from_rows): black where a cell is None."""
    num_cols = num_cols or max((len(r) for r in rows), default=1)
    sizes = [img.shape[:2] for row in rows for img in row if img is not None]
    cell_h = max((s[0] for s in sizes), default=1)
    cell_w = max((s[1] for s in sizes), default=1)
    scale = min(max_cell / max(cell_h, cell_w, 1), 1.0)
    cell_h, cell_w = max(int(cell_h * scale), 1), max(int(cell_w * scale), 1)
    grid = np.zeros((cell_h * len(rows), cell_w * num_cols, 3), np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row[:num_cols]):
            if img is None:
                continue
            arr = (np.asarray(img, np.float32) * 255).clip(0, 255).astype(np.uint8)
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, -1)
            if arr.shape[:2] != (cell_h, cell_w):
                arr = np.asarray(Image.fromarray(arr).resize((cell_w, cell_h), Image.BILINEAR))
            grid[r * cell_h:(r + 1) * cell_h, c * cell_w:(c + 1) * cell_w] = arr[..., :3]
    return grid


def write_png(image: np.ndarray, path: str | os.PathLike) -> str:
    """Save a uint8 [H, W, 3] image as PNG (creating the folder); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(path, format="PNG")
    return path


def write_animation(frames: Iterable[np.ndarray], path: str | os.PathLike, fps: float = 4.0) -> str:
    """Save uint8 [H, W, 3] images as an animated GIF (.gif) or H.264 video (.mp4, via PyAV)."""
    path = os.fspath(path)
    frames = [np.asarray(f, np.uint8) for f in frames]
    if not frames:
        raise ValueError("no frames to animate")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if path.endswith(".gif"):
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return path
    import av

    h, w = frames[0].shape[:2]
    even = [np.pad(f, ((0, h % 2), (0, w % 2), (0, 0))) for f in frames]  # yuv420p needs even sizes
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4",
                                      rate=max(int(round(fps)), 1))
        stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
        for f in even:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return path


# ----------------------------------------------------------------------------------------------------
# Forecast pictures
# ----------------------------------------------------------------------------------------------------


def forecast_rows(context: Sequence[np.ndarray | None], truth: Sequence[np.ndarray | None] | None,
                  futures: dict[str, Sequence[np.ndarray]]) -> tuple[list[list], list[str]]:
    """Rows for a grid of several futures side by side with the truth: the first row is the context then
    the true future (empty where unknown); then one row per named future (e.g. 'best', 'mean',
    'sample 0', ...) with empty context cells. Returns (rows, row names)."""
    ctx = list(context)
    horizon = max(len(f) for f in futures.values()) if futures else 0
    first = ctx + (list(truth) if truth is not None else [None] * horizon)
    rows, names = [first], ["truth"]
    for name, future in futures.items():
        rows.append([None] * len(ctx) + list(future))
        names.append(name)
    return rows, names


def label_rows(image: np.ndarray, names: Sequence[str], cell_height: int) -> np.ndarray:
    """Prepend a strip with each row's name (PIL's default font) to a grid image."""
    from PIL import ImageDraw

    strip = Image.new("RGB", (max(8 * max((len(n) for n in names), default=1), 24), image.shape[0]))
    draw = ImageDraw.Draw(strip)
    for i, name in enumerate(names):
        draw.text((2, i * cell_height + 2), name, fill=(255, 255, 255))
    return np.concatenate([np.asarray(strip), image], axis=1)


def futures_picture(context: Sequence[np.ndarray | None], truth: Sequence[np.ndarray | None] | None,
                    futures: dict[str, Sequence[np.ndarray]], with_names: bool = True,
                    frames: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """uint8 grid: row 'truth' (context + true future), then one row per future ('best', 'mean', samples);
    `frames` (the video frames of context + future), when given, is a first row 'frames'."""
    rows, names = forecast_rows(context, truth, futures)
    if frames is not None:
        rows, names = [list(frames)] + rows, ["frames"] + names
    return grid_with_row_names(rows, names) if with_names else grid_image(rows)


def grid_with_row_names(rows: Sequence[Sequence[np.ndarray | None]], names: Sequence[str],
                  max_cell: int = 256) -> np.ndarray:
    """uint8 grid of `rows` (as wide as the longest row) with each row's name on a strip to its left."""
    image = grid_image(rows, max(len(r) for r in rows), max_cell)
    return label_rows(image, names, image.shape[0] // len(rows))


def head_maps(head, feats_tnd: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """A head on features [T, N, D] laid out on the patch grid (models.heads.on_patch_grid) as numpy, in one
    call compiled once per head structure and shape (eager calls would compile op by op)."""
    return np.asarray(_jit_on_patch_grid(head, np.asarray(feats_tnd, np.float32), tuple(grid_hw)))


_jit_on_patch_grid = nnx.jit(on_patch_grid, static_argnums=2)


def pixel_frames(vfm, feats: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """The pixel-patch VFM's features [..., N, D] back to uint8 frames [..., H, W, 3] (its patches_to_frames)
    as numpy, in one call compiled once per shape (eager calls would compile op by op)."""
    return np.asarray(_jit_patches_to_frames(vfm, np.asarray(feats, np.float32), tuple(grid_hw)))


_jit_patches_to_frames = nnx.jit(lambda vfm, feats, grid_hw: vfm.patches_to_frames(feats, grid_hw),
                                 static_argnums=2)


def evaluation_pictures(output: dict, head=None, rgb_head=None, index: int = 0,
                        max_samples: int = 4) -> dict[str, np.ndarray]:
    """Pictures of one clip of an `Evaluator.update` output (the official _plot_feats / _plot_task /
    _plot_rgb, plus a grid of individual samples): {name: uint8 [H, W, 3]}.

    feats_<sel>:  frames / PCA of the true features / PCA of the prediction (projection fit on the truth)
    <task>_<sel>: frames / ground-truth labels / head on the true features / head on the prediction
    rgb_<sel>:    frames / RGB decode of the true features / RGB decode of the prediction
    samples_<task>: truth, best, mean and the first `max_samples` sampled futures side by side."""
    forecast, grid_hw = output["forecast"], tuple(output["clip"].grid_hw)
    context = np.asarray(forecast.context[index], np.float32)
    truth = np.asarray(forecast.targets[index], np.float32)
    num_ctx, horizon = context.shape[0], truth.shape[0]
    frames = [frame_image(f) for f in np.asarray(output["frames"][index])[-(num_ctx + horizon):]]
    labels = output.get("labels")
    labels = None if labels is None else np.asarray(labels[index])[-(num_ctx + horizon):]
    all_truth = np.concatenate([context, truth])
    predictions = {name: np.asarray(sel[0][index], np.float32) for name, sel in output["selections"].items()}
    samples = np.asarray(forecast.rollouts[index], np.float32)
    pictures = {}
    blanks = [None] * num_ctx

    for name, pred in predictions.items():
        truth_pca, pred_pca = feature_pca(all_truth, np.concatenate([context, pred]), grid_hw=grid_hw)
        pictures[f"feats_{name}"] = grid_image([frames, truth_pca, blanks + pred_pca[num_ctx:]], len(frames))

    def task_images(feats_list, gt_labels=None):
        """(ground-truth images or None, one image list per features), depth on ONE shared scale."""
        outs = [head_maps(head, f, grid_hw) for f in feats_list]
        if isinstance(head, SegHead):
            gt = None if gt_labels is None else list(colour_segmentation(gt_labels))
            return gt, [[colour_segmentation(o) for o in out.argmax(-1)] for out in outs], "seg"
        sets = colour_depths(*([] if gt_labels is None else [list(gt_labels)]), *[list(o) for o in outs])
        return (None if gt_labels is None else sets[0]), sets[gt_labels is not None:], "depth"

    if head is not None:
        gt, (oracle, *preds), task = task_images([all_truth, *predictions.values()], labels)
        gt = gt if gt is not None else [None] * len(frames)
        for name, pred_imgs in zip(predictions, preds):  # predictions cover the future frames only
            pictures[f"{task}_{name}"] = grid_image([frames, gt, oracle, blanks + pred_imgs], len(frames))
        shown = {"best": predictions.get("best"), "mean": predictions["mean"],
                 **{f"sample {i}": s for i, s in enumerate(samples[:max_samples])}}
        shown = {k: v for k, v in shown.items() if v is not None}
        _, imgs, _ = task_images([all_truth, *shown.values()])
        pictures[f"samples_{task}"] = futures_picture(imgs[0][:num_ctx], imgs[0][num_ctx:], dict(zip(shown, imgs[1:])),
                                                      frames=frames)

    if rgb_head is not None:
        decode = lambda f: [rgb_image(x) for x in head_maps(rgb_head, f, grid_hw)]
        true_rgb = decode(all_truth)
        for name, pred in predictions.items():
            pictures[f"rgb_{name}"] = grid_image([frames, true_rgb, blanks + decode(pred)], len(frames))
    return pictures
