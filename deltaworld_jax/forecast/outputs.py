"""What the forecast command makes: sampled futures of the views of a clip, their errors against the true
future frames, labelled pictures (grid, animation, segmentation / depth) and the summary files."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from deltaworld_jax.forecast.inputs import Clip, stitch

HEADER_HEIGHT = 28  # pixels of column titles above the pictures' grids


# ----------------------------------------------------------------------------------------------------
# Forecast and scores
# ----------------------------------------------------------------------------------------------------


def forecast_views(models: dict[str, Any], views: np.ndarray, timestamps: np.ndarray, *, context: int,
                   horizon: int, stride: float, num_samples: int, seed: int = 0) -> dict[str, Any]:
    """Sample futures of V views [V, T, H, W, 3] of one clip (T = context + the k <= horizon true future
    frames): {'rollouts' [V, S, horizon, N, D], 'context' [V, c, N, D], 'truth' [V, k, N, D], 'grid_hw'}."""
    import jax
    import jax.numpy as jnp

    from deltaworld_jax.evaluation.protocol import vfm_features
    from deltaworld_jax.evaluation.forecasters import jit_deltaworld_rollout

    vfm = models["vfm"]
    grid_hw = tuple(vfm.grid_hw(views.shape[1:]))
    num_views = views.shape[0]
    feats = vfm_features(vfm, jnp.asarray(views))  # [V, T, N, D]
    black = vfm_features(vfm, jnp.zeros((1, *views.shape[2:]), jnp.uint8))
    known_future = views.shape[1] - context
    # The rollout takes the future frames only as targets: pad unknown ones, and extend the timestamps.
    future_feats = jnp.concatenate([feats[:, context:], jnp.zeros_like(feats[:, :horizon - known_future])], 1)
    clip_feats = jnp.concatenate([feats[:, :context], future_feats], 1)
    times = np.concatenate([timestamps[:context], timestamps[context - 1] + stride * np.arange(1, horizon + 1)])
    times[context:context + known_future] = timestamps[context:]
    times = np.broadcast_to(times[None], (num_views, len(times)))
    rollouts, _ = jit_deltaworld_rollout(models["world"], models["tokenizer"], clip_feats,
                                         jnp.asarray(times, jnp.float32), black, jax.random.key(seed),
                                         ctx_len=context, grid_hw=grid_hw, num_samples=num_samples)
    return {"rollouts": np.asarray(rollouts), "context": np.asarray(feats[:, :context]),
            "truth": np.asarray(feats[:, context:]), "grid_hw": grid_hw, "times": times[0]}


def forecast_features(models: dict[str, Any], frames: np.ndarray, timestamps: np.ndarray, *, context: int,
                      horizon: int, stride: float, num_samples: int, seed: int = 0) -> dict[str, Any]:
    """Sample futures of one clip [T, H, W, 3] (any H x W of whole patches): {'rollouts' [S, horizon, N, D],
    'context' [c, N, D], 'truth' [k, N, D] (k <= horizon true future frames read from the video), 'best'
    index or None, 'grid_hw'}."""
    out = forecast_views(models, frames[None], timestamps, context=context, horizon=horizon, stride=stride,
                         num_samples=num_samples, seed=seed)
    scores = score(out)
    best = scores["best_sample"][0] if scores and out["truth"].shape[1] == horizon and num_samples > 1 else None
    return {"rollouts": out["rollouts"][0], "context": out["context"][0], "truth": out["truth"][0],
            "best": None if best is None else int(best), "grid_hw": out["grid_hw"]}


def feature_error(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The DeltaWorld criterion (evaluation.forecasters.world_criterion: smooth-L1, beta 0.1) averaged over
    patches and channels, as numpy."""
    from deltaworld_jax.evaluation.forecasters import world_criterion

    return np.asarray(world_criterion(np.asarray(pred), np.asarray(target)).mean(axis=(-2, -1)))


def score(out: dict[str, Any]) -> dict[str, Any] | None:
    """Errors against the true future frames (None when the video has none after the context), per view:
    'per_sample' [V, S, k], 'mean' [V, k] (mean of the samples' features), 'copy_last' [V, k], 'best'
    [V, k] and 'best_sample' [V] (the sample with the lowest error on the last known future frame)."""
    truth = out["truth"]
    k = truth.shape[1]
    if k == 0:
        return None
    rollouts = out["rollouts"][:, :, :k]
    per_sample = feature_error(rollouts, truth[:, None])  # [V, S, k]
    best_sample = np.argmin(per_sample[:, :, -1], axis=1)
    return {"per_sample": per_sample, "best_sample": best_sample,
            "best": per_sample[np.arange(len(best_sample)), best_sample],
            "mean": feature_error(rollouts.mean(1), truth),
            "copy_last": feature_error(np.broadcast_to(out["context"][:, -1:], truth.shape), truth)}


# ----------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------


def decode_features(models: dict[str, Any], result: dict[str, Any], fit_on: np.ndarray | None = None):
    """A function features [k, N, D] -> list of float images [H, W, 3] in [0, 1], and its name. A feature
    PCA is fit on `fit_on` (default: the result's context and truth)."""
    from deltaworld_jax.models.dinov3 import PixelPatchVFM
    from deltaworld_jax.evaluation import pictures

    vfm, grid_hw = models["vfm"], result["grid_hw"]
    if models.get("rgb_head") is not None:
        head = models["rgb_head"]

        def rgb(f):
            return [pictures.rgb_image(x) for x in pictures.head_maps(head, f, grid_hw)]

        return rgb, "rgb"
    if isinstance(vfm, PixelPatchVFM):
        return lambda f: [pictures.frame_image(x) for x in pictures.pixel_frames(vfm, f, grid_hw)], "pixels"
    if fit_on is None:
        fit_on = np.concatenate([result["context"], result["truth"]])

    def pca(f):
        return pictures.feature_pca(fit_on, np.asarray(f), grid_hw=grid_hw)[1]

    return pca, "pca"


MIN_CELL_WIDTH = 112  # pixels: a column title ("context 0.00s") fits


def upscale_factor(cell_width: int) -> int:
    """Whole-number enlargement of grid cells narrower than MIN_CELL_WIDTH."""
    return max(1, -(-MIN_CELL_WIDTH // max(cell_width, 1)))


def labelled_grid(rows: list[list[np.ndarray | None]], row_names: list[str], column_names: list[str],
                  context: int, max_cell: int = 256) -> np.ndarray:
    """uint8 grid with a name strip on the left, column titles on top, and the context columns marked
    (a blue bar over them; the futures' columns get an orange one)."""
    from PIL import ImageDraw

    from deltaworld_jax.evaluation import pictures

    body = pictures.grid_image(rows, len(column_names), max_cell=max_cell)
    cell_h, cell_w = body.shape[0] // len(rows), body.shape[1] // len(column_names)
    k = upscale_factor(cell_w)
    if k > 1:  # small frames (the demo's 32 px): whole-pixel blocks, so the titles fit and pixels stay visible
        body = body.repeat(k, 0).repeat(k, 1)
        cell_h, cell_w = cell_h * k, cell_w * k
    strip_w = max(8 * max(len(n) for n in row_names) + 6, 40)
    header_h = HEADER_HEIGHT
    canvas = Image.new("RGB", (strip_w + body.shape[1], header_h + body.shape[0]), (24, 24, 24))
    canvas.paste(Image.fromarray(body), (strip_w, header_h))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(column_names):
        x = strip_w + c * cell_w
        colour = (60, 120, 230) if c < context else (235, 140, 40)
        draw.rectangle([x + 1, header_h - 6, x + cell_w - 2, header_h - 2], fill=colour)
        draw.text((x + 3, 3), name, fill=(255, 255, 255))
    for r, name in enumerate(row_names):
        draw.text((3, header_h + r * cell_h + 3), name, fill=(255, 255, 255))
    return np.asarray(canvas)


def _column_names(times: np.ndarray, context: int, num_truth: int, horizon: int) -> list[str]:
    names = [f"context {t:.2f}s" for t in times[:context]]
    for k in range(horizon):
        names.append(f"+{k + 1} {times[context + k]:.2f}s" + ("" if k < num_truth else " (no frame)"))
    return names


def draw(models: dict[str, Any], frames: np.ndarray, result: dict[str, Any], out_dir: str, fps: float = 4.0,
         layout: dict | None = None, views: list[dict] | None = None,
         times: np.ndarray | None = None) -> dict[str, str]:
    """Write forecast.png (grid), forecast.gif and forecast.mp4; returns their paths. `frames` are the frames
    as drawn; `views` the per-view results of a split frame (stitched back with `layout`)."""
    from deltaworld_jax.evaluation import pictures

    views = views or [result]
    layout = layout or {"frame_hw": frames.shape[1:3], "offsets": [(0, 0)]}
    context = views[0]["context"].shape[0]
    horizon = views[0]["rollouts"].shape[1]
    best = [v.get("best") for v in views]

    fit_on = np.concatenate([np.concatenate([v["context"], v["truth"]]) for v in views])  # one PCA for all views

    def decoded(select) -> list[np.ndarray]:
        per_view = []
        for v in views:
            decode, _ = decode_features(models, v, fit_on)
            per_view.append(decode(select(v)))
        return [stitch([pv[k] for pv in per_view], layout) for k in range(len(per_view[0]))]

    futures = {}
    if all(b is not None for b in best):
        futures["best"] = decoded(lambda v: v["rollouts"][v["best"]])
    futures["mean"] = decoded(lambda v: v["rollouts"].mean(0))
    for i in range(views[0]["rollouts"].shape[0]):
        futures[f"sample {i}"] = decoded(lambda v, i=i: v["rollouts"][i])
    how = decode_features(models, views[0])[1]
    frame_imgs = [pictures.frame_image(f) for f in frames]
    num_truth = len(frame_imgs) - context
    times = np.asarray(times if times is not None else np.arange(context + horizon), np.float64)
    rows = [frame_imgs + [None] * (horizon - num_truth)]
    row_names = ["frames" if num_truth else "frames (no future)"]
    for name, images in futures.items():
        rows.append([None] * context + list(images))
        row_names.append(f"{name} ({how})")
    grid = labelled_grid(rows, row_names, _column_names(times, context, num_truth, horizon), context)
    paths = {"grid": pictures.write_png(grid, os.path.join(out_dir, "forecast.png"))}
    # Animation: the context (the same in every panel), then each step with every sample side by side.
    panels = ["frames"] + list(futures)
    steps = []
    for t in range(context + horizon):
        if t < context:
            row = [frame_imgs[t]] * len(panels)
        else:
            k = t - context
            row = [frame_imgs[t] if t < len(frame_imgs) else None] + [futures[name][k] for name in futures]
        title = f"context {t + 1}/{context}" if t < context else f"future +{t - context + 1}"
        steps.append(labelled_grid([row], [title], panels, context=len(panels) if t < context else 1))
    paths["gif"] = pictures.write_animation(steps, os.path.join(out_dir, "forecast.gif"), fps=fps)
    paths["mp4"] = pictures.write_animation(steps, os.path.join(out_dir, "forecast.mp4"), fps=fps)
    logging.info("futures drawn as %s: %s", how, paths)
    return paths


def draw_heads(models: dict[str, Any], views: list[dict], layout: dict, frames_times: np.ndarray, out_dir: str,
               ) -> tuple[dict[str, str], dict[str, Any]]:
    """segmentation.png / depth.png of the context, the truth and the futures (when heads are given), and
    how well the best / mean future's maps agree with the truth's (pixel agreement %, depth RMSE m)."""
    from deltaworld_jax.evaluation import pictures

    paths, agreement = {}, {}
    context = views[0]["context"].shape[0]
    horizon = views[0]["rollouts"].shape[1]
    num_truth = views[0]["truth"].shape[0]
    for name in ("seg_head", "depth_head"):
        head = models.get(name)
        if head is None:
            continue
        grid_hw = views[0]["grid_hw"]
        rows_src = {"frames": lambda v: np.concatenate([v["context"], v["truth"]]),
                    "mean": lambda v: v["rollouts"].mean(0)}
        if all(v.get("best") is not None for v in views):
            rows_src = {"frames": rows_src["frames"], "best": lambda v: v["rollouts"][v["best"]],
                        "mean": rows_src["mean"]}
        maps = {row: [pictures.head_maps(head, fn(v), grid_hw) for v in views] for row, fn in rows_src.items()}
        if name == "seg_head":
            maps = {row: [m.argmax(-1) for m in ms] for row, ms in maps.items()}
        else:
            maps = {row: [m[..., 0] if m.ndim == 4 else m for m in ms] for row, ms in maps.items()}
        if num_truth:
            for row in maps:
                if row == "frames":
                    continue
                truth = [m[context:] for m in maps["frames"]]
                pred = [m[:num_truth] for m in maps[row]]
                if name == "seg_head":
                    agreement.setdefault("segmentation_agreement_percent", {})[row] = float(np.mean(
                        [100.0 * (p == t).mean() for p, t in zip(pred, truth)]))
                else:
                    agreement.setdefault("depth_rmse_to_truth_features_m", {})[row] = float(np.sqrt(np.mean(
                        [((p - t) ** 2).mean() for p, t in zip(pred, truth)])))

        patch = patch_size_of(models)

        def to_images(per_view):
            """Per-view maps [k, gh, gw] -> one frame-sized map per step (patches as blocks)."""
            up = [np.asarray(m, np.float32).repeat(patch, 1).repeat(patch, 2)[..., None] for m in per_view]
            return [stitch([u[k] for u in up], layout)[..., 0] for k in range(len(up[0]))]

        images = {row: to_images(ms) for row, ms in maps.items()}
        if name == "seg_head":
            images = {row: [pictures.colour_segmentation(m.round().astype(np.int64)) for m in ims]
                      for row, ims in images.items()}
        else:
            rows_list = list(images)
            images = dict(zip(rows_list, pictures.colour_depths(*[images[r] for r in rows_list])))
        rows = [list(images["frames"]) + [None] * (horizon - num_truth)]
        row_names = ["frames"]
        for row in images:
            if row != "frames":
                rows.append([None] * context + list(images[row]))
                row_names.append(row)
        grid = labelled_grid(rows, row_names, _column_names(frames_times, context, num_truth, horizon), context)
        file = "segmentation.png" if name == "seg_head" else "depth.png"
        paths[file.split(".")[0]] = pictures.write_png(grid, os.path.join(out_dir, file))
    return paths, agreement


def patch_size_of(models) -> int:
    return int(models["vfm"].patch_size)


# ----------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------


def summarise(clip: Clip, scores: dict | None, settings: dict, num_views: int, heads: dict) -> dict:
    """summary.json content: settings, frame times, and the scores averaged over the views of the frame."""
    out = {"settings": settings,
           "video": {"frames": clip.num_video_frames, "duration_s": round(clip.duration, 4),
                     "fps": round(clip.fps, 4), "first_frame_stamp_s": round(clip.first_stamp, 4)},
           "frame_times_s": [round(float(t), 4) for t in clip.video_times],
           "wanted_times_s": [round(float(t), 4) for t in clip.wanted],
           "uneven_stride_s": round(clip.uneven, 4), "views": num_views, **heads}
    if scores is None:
        out["scores"] = None
        out["note"] = "the video ends with the context: no true future frames to score against"
        return out
    per_sample = scores["per_sample"].mean(0)  # [S, k] averaged over views
    out["scores"] = {
        "criterion": "smooth-L1 (beta 0.1) of features to the true future frames' features, per future step",
        "per_sample": [[round(float(x), 6) for x in row] for row in per_sample],
        "best_sample_per_view": [int(b) for b in scores["best_sample"]],
        "best": [round(float(x), 6) for x in scores["best"].mean(0)],
        "mean_of_samples": [round(float(x), 6) for x in scores["mean"].mean(0)],
        "copy_last": [round(float(x), 6) for x in scores["copy_last"].mean(0)],
    }
    return out


def write_summary(out: str, stem: str, summary: dict, markdown: str) -> dict[str, str]:
    """<out>/<stem>.json (the summary) and <out>/<stem>.md (its table for people); returns both paths."""
    os.makedirs(out, exist_ok=True)
    paths = {"summary_json": os.path.join(out, f"{stem}.json"), "summary_md": os.path.join(out, f"{stem}.md")}
    with open(paths["summary_json"], "w") as f:
        json.dump(summary, f, indent=2)
    with open(paths["summary_md"], "w") as f:
        f.write(markdown)
    return paths


def summary_markdown(summary: dict) -> str:
    s = summary["settings"]
    lines = [f"# Forecast of {s['video']}", "",
             f"crop `{s['crop']}` ({summary['views']} view(s)), frames {s['frame_hw'][0]}x{s['frame_hw'][1]}, "
             f"{s['num_samples']} samples, context {s['context']}, horizon {s['horizon']}, stride {s['stride']} s, "
             f"start {s['start']} s after the first frame.", "",
             f"Video: {summary['video']['frames']} frames over {summary['video']['duration_s']} s "
             f"({summary['video']['fps']} fps), first frame stamped {summary['video']['first_frame_stamp_s']} s.", "",
             "Frame times used (s from the first frame): " + ", ".join(f"{t:.3f}" for t in summary["frame_times_s"])]
    if summary["uneven_stride_s"] > 1e-3:
        lines.append(f"(the stride is not a whole number of frames: used times differ from the wanted ones by up "
                     f"to {summary['uneven_stride_s']:.3f} s)")
    lines.append("")
    sc = summary["scores"]
    if sc is None:
        lines.append(summary["note"])
    else:
        steps = len(sc["best"])
        lines += [f"Error to the true future ({sc['criterion']}; lower is better):", "",
                  "| forecast | " + " | ".join(f"+{k + 1}" for k in range(steps)) + " |",
                  "|---|" + "---|" * steps]
        for name, key in (("best sample", "best"), ("mean of samples", "mean_of_samples"), ("copy last", "copy_last")):
            lines.append(f"| {name} | " + " | ".join(f"{x:.4f}" for x in sc[key]) + " |")
        for i, row in enumerate(sc["per_sample"]):
            lines.append(f"| sample {i} | " + " | ".join(f"{x:.4f}" for x in row) + " |")
        lines.append("")
        lines.append(f"Best sample (per view, chosen on the last known future frame): {sc['best_sample_per_view']}")
    for key in ("segmentation_agreement_percent", "depth_rmse_to_truth_features_m"):
        if key in summary:
            lines.append(f"{key}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary[key].items()))
    return "\n".join(lines) + "\n"

