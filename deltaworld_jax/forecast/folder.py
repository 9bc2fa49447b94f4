"""Forecast and score every video of a folder: `python -m deltaworld_jax.forecast --videos=DIR ...`.

The official protocol on your own footage: from each video one clip of context + max(horizons) frames at
a fixed stride (from --start seconds after its first frame); for each horizon h the window that ENDS the
clip, the first `context` frames as context and the last h predicted (evaluation.py). Scored per step
with the DeltaWorld criterion (smooth-L1, beta 0.1, on features) against the true frames: the best of the
samples (lowest error on the last step), the mean of the samples, and copy-last (the lower bound).

Clips are batched (--batch_size, the last batch padded with repeats that are not scored) so each frame
shape compiles once. Wide frames follow --crop: `two_squares` splits each clip into the two overlapping
squares of the official evaluation (a clip's score is the mean of its two crops), `full` keeps the
whole frame, `center` its centre square.

Writes to --out: folder_summary.json / folder_summary.md (the best / mean / copy-last table per horizon,
per-video rows, skipped videos with the reason, throughput) and pictures/<n>_<video>/ for the first clips.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from absl import logging

from deltaworld_jax.forecast import inputs as fi
from deltaworld_jax.forecast import outputs as fo

SELECTIONS = ("best", "mean", "copy_last")


def _clip_losses(rollouts: np.ndarray, targets: np.ndarray, context_last: np.ndarray) -> dict[str, np.ndarray]:
    """Per clip-view and step [B, h]: best (chosen on the last step), mean of samples, copy-last."""
    per_sample = fo.feature_error(rollouts, targets[:, None])  # [B, S, h]
    best = np.argmin(per_sample[:, :, -1], axis=1)
    return {"best": per_sample[np.arange(len(best)), best], "mean": fo.feature_error(rollouts.mean(1), targets),
            "copy_last": fo.feature_error(np.broadcast_to(context_last[:, None], targets.shape), targets),
            "best_sample": best}


def _layout(frame_hw: tuple[int, int], crop: str) -> dict:
    h, w = frame_hw
    if crop != "two_squares" or h == w:
        return {"crop": crop, "frame_hw": (h, w), "offsets": [(0, 0)]}
    s = min(h, w)
    return {"crop": crop, "frame_hw": (h, w), "offsets": [(0, 0), (0, w - s)] if w > h else [(0, 0), (h - s, 0)]}


def run_folder(*, videos: str, out: str, vfm: str, tokenizer: str, world: str, num_samples: int = 8,
               context: int = 4, stride: float = 0.2, start: float = 0.0, size: int = 512, crop: str = fi.DEFAULT_CROP,
               patch_size: int = 16, position_channels: int = 0, world_num_heads: int | None = None,
               world_rope_axis_sizes=None, world_rope_unrotated_size: int | None = None, seed: int = 0,
               horizons: tuple[int, ...] = (1, 3), batch_size: int = 8, max_videos: int = 0, pictures: int = 4,
               models: dict | None = None) -> dict[str, str]:
    """Score every video under `videos`; returns the written paths."""
    import jax
    import jax.numpy as jnp

    from deltaworld_jax.data import video as video_io
    from deltaworld_jax.data.sampling import square_crops
    from deltaworld_jax.evaluation.protocol import vfm_features
    from deltaworld_jax.evaluation.forecasters import ClipFeatures, DeltaWorldForecaster

    horizons = tuple(sorted(set(int(h) for h in horizons)))
    fi.validate(videos=videos, vfm=vfm, tokenizer=tokenizer, world=world, num_samples=num_samples, context=context,
                horizon=max(horizons), stride=stride, start=start, size=size, crop=crop, patch_size=patch_size)
    if batch_size < 1:
        raise fi.ForecastInputError(f"--batch_size ({batch_size}) must be >= 1")
    listing = video_io.list_videos(videos)
    fi.progress(listing.summary())
    if not listing.videos:
        raise fi.ForecastInputError(f"no videos found under {videos!r}; accepted: "
                                    f"{video_io.accepted_extensions_text()}")
    paths = listing.videos[:max_videos] if max_videos > 0 else listing.videos
    batch_size = min(batch_size, len(paths))  # a small folder is one batch, not padded up to --batch_size
    num_frames = context + max(horizons)
    if models is None:
        fi.progress("loading models")
        models = fi.load_models(vfm, tokenizer, world, patch_size=patch_size, position_channels=position_channels,
                                world_num_heads=world_num_heads, world_rope_axis_sizes=world_rope_axis_sizes,
                                world_rope_unrotated_size=world_rope_unrotated_size)
    patch = fo.patch_size_of(models)
    if size % patch:
        raise fi.ForecastInputError(f"--size {size} is not a multiple of the VFM patch size {patch}")
    forecaster = DeltaWorldForecaster(models["world"], models["tokenizer"], num_samples=num_samples)
    rng = jax.random.key(seed)

    rows: list[dict] = []
    skipped: list[dict] = []
    drawn: list[str] = []
    groups: dict[tuple, list[dict]] = {}
    black_cache: dict[tuple, Any] = {}
    batch_times: list[float] = []
    batches_run = [0]
    first_batch: list = []  # [time it finished, clips in it]: the rate after it leaves compilation out
    began = time.perf_counter()

    def flush(shape: tuple) -> None:
        clips = groups.pop(shape)
        real = len(clips)
        padded = clips + [clips[-1]] * (batch_size - real)  # one compiled shape per frame size
        t0 = time.perf_counter()
        frames = np.stack([c["frames"] for c in padded])  # [B, T, H, W, 3]
        times = np.stack([c["times"] for c in padded]).astype(np.float32)
        num_views = 1
        if crop == "two_squares" and frames.shape[2] != frames.shape[3]:
            frames, _, _, _ = square_crops(frames, None)  # [2B, ...]: first crops, then second
            times = np.concatenate([times, times])
            num_views = 2
        hw = frames.shape[2:4]
        feats = vfm_features(models["vfm"], jnp.asarray(frames))
        if hw not in black_cache:
            black_cache[hw] = vfm_features(models["vfm"], jnp.zeros((1, *hw, 3), jnp.uint8))
        clip = ClipFeatures(feats, jnp.asarray(times), tuple(models["vfm"].grid_hw(frames.shape[1:])), black_cache[hw])
        per_h = {}
        for h in horizons:
            key = jax.random.fold_in(jax.random.fold_in(rng, batches_run[0]), h)
            result = forecaster(clip, ctx_len=context, horizon=h, rng=key)
            rollouts, targets = np.asarray(result.rollouts), np.asarray(result.targets)
            ctx = np.asarray(result.context)
            per_h[h] = (_clip_losses(rollouts, targets, ctx[:, -1]), rollouts, targets, ctx)
        batch_times.append(time.perf_counter() - t0)
        batches_run[0] += 1
        if batches_run[0] == 1:
            first_batch[:] = [time.perf_counter(), real]
        for i, c in enumerate(clips):
            row = {"video": c["name"], "frame_times_s": [round(float(t), 4) for t in c["video_times"]]}
            for h in horizons:
                losses = per_h[h][0]
                idx = [i + v * batch_size for v in range(num_views)]
                for sel in SELECTIONS:
                    row[f"h{h}_{sel}"] = [round(float(x), 6) for x in losses[sel][idx].mean(0)]
            rows.append(row)
            if len(drawn) < pictures:
                h = max(horizons)
                losses, rollouts, targets, ctx = per_h[h]
                views = [{"rollouts": rollouts[j], "context": ctx[j], "truth": targets[j],
                          "best": int(losses["best_sample"][j]) if num_samples > 1 else None,
                          "grid_hw": clip.grid_hw} for j in idx]
                folder = os.path.join(out, "pictures", f"{len(drawn):02d}_{os.path.basename(c['name'])}")
                window = c["frames"][-(context + h):]
                t = c["times"][-(context + h):]
                fo.draw(models, window, views[0], folder, layout=_layout(window.shape[1:3], crop), views=views,
                        times=t - t[0] + c["video_times"][-(context + h)])
                drawn.append(folder)
        fi.progress(f"batch {batches_run[0]}: {real} clips ({num_views} view(s) of {hw[0]}x{hw[1]} px) in "
                    f"{batch_times[-1]:.1f} s; {len(rows)}/{len(paths)} videos scored, {len(skipped)} skipped")

    for index, path in enumerate(paths):
        name = os.path.relpath(path, videos)
        try:
            clip = fi.load_clip(path, start=start, stride=stride, count=num_frames, min_count=num_frames)
        except fi.ForecastInputError as e:
            skipped.append({"video": name, "reason": str(e)})
            logging.warning("skipping %s: %s", name, e)
            continue
        if crop == "two_squares":
            h, w = clip.frames.shape[1:3]
            scale = size / min(h, w)
            frames = fi.resize_frames(clip.frames, (max(size, round(h * scale)), max(size, round(w * scale))))
        else:
            frames = fi.crop_views(clip.frames, size, crop, patch)[0][0]
        shape = frames.shape
        groups.setdefault(shape, []).append({"name": name, "frames": frames, "times": clip.times,
                                             "video_times": clip.video_times})
        if len(groups[shape]) == batch_size:
            flush(shape)
    for shape in list(groups):
        flush(shape)
    elapsed = time.perf_counter() - began

    table = {}
    for h in horizons:
        table[f"h{h}"] = {sel: ([round(float(x), 6) for x in np.mean([r[f"h{h}_{sel}"] for r in rows], axis=0)]
                                if rows else None) for sel in SELECTIONS}
    steady = time.perf_counter() - first_batch[0] if first_batch else 0.0
    steady_clips = len(rows) - first_batch[1] if first_batch else 0
    summary = {
        "settings": dict(videos=videos, crop=crop, size=size, num_samples=num_samples, context=context,
                         horizons=list(horizons), stride=stride, start=start, seed=seed, batch_size=batch_size,
                         vfm=vfm, tokenizer=tokenizer, world=world),
        "criterion": "smooth-L1 (beta 0.1) of features to the true frames' features, per predicted step; "
                     "best = the sample with the lowest error on the last step",
        "videos_scored": len(rows), "videos_skipped": skipped, "files_ignored": listing.ignored,
        "table": table, "per_video": rows, "pictures": drawn,
        "seconds": round(elapsed, 2),
        "videos_per_minute": round(60.0 * len(rows) / elapsed, 2) if elapsed > 0 and rows else None,
        # reading, forecasting and scoring after the first batch (whose time is mostly compilation)
        "videos_per_minute_after_first_batch": (round(60.0 * steady_clips / steady, 2)
                                                if steady > 0 and steady_clips > 0 else None),
    }
    written = fo.write_summary(out, "folder_summary", summary, folder_markdown(summary))
    fi.progress(f"{len(rows)} videos scored, {len(skipped)} skipped, {len(listing.ignored)} files ignored, in "
                f"{elapsed:.1f} s ({summary['videos_per_minute']} videos/min): {written['summary_md']}")
    return written


def folder_markdown(summary: dict) -> str:
    s = summary["settings"]
    lines = [f"# Forecasts of the videos in {s['videos']}", "",
             f"{summary['videos_scored']} videos scored, {len(summary['videos_skipped'])} skipped, "
             f"{len(summary['files_ignored'])} other files ignored. Crop `{s['crop']}`, short side {s['size']} px, "
             f"{s['num_samples']} samples, context {s['context']}, stride {s['stride']} s from {s['start']} s; "
             f"{summary['seconds']} s ({summary['videos_per_minute']} videos/min).", "",
             f"Error ({summary['criterion']}; lower is better), mean over videos:", "",
             "| horizon | step | best | mean | copy-last |", "|---|---|---|---|---|"]
    for h, entry in summary["table"].items():
        if entry["best"] is None:
            continue
        for k in range(len(entry["best"])):
            lines.append(f"| {h[1:]} | +{k + 1} | {entry['best'][k]:.4f} | {entry['mean'][k]:.4f} | "
                         f"{entry['copy_last'][k]:.4f} |")
    lines += ["", "Per video (last step of each horizon: best / mean / copy-last):", "",
              "| video | " + " | ".join(f"h{h}" for h in s["horizons"]) + " |", "|---|" + "---|" * len(s["horizons"])]
    for row in summary["per_video"]:
        cells = [" / ".join(f"{row[f'h{h}_{sel}'][-1]:.4f}" for sel in SELECTIONS) for h in s["horizons"]]
        lines.append(f"| {row['video']} | " + " | ".join(cells) + " |")
    if summary["videos_skipped"]:
        lines += ["", "Skipped:", ""] + [f"- {x['video']}: {x['reason']}" for x in summary["videos_skipped"]]
    if summary["files_ignored"]:
        lines += ["", "Ignored (not videos): " + ", ".join(os.path.basename(p) for p in summary["files_ignored"])]
    return "\n".join(lines) + "\n"
