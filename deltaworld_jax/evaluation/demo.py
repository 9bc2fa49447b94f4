"""The demo's final evaluation (configs/demo.py): the trainer's hook at DeltaWorld's last step.

`evaluate_demo(config, world, frozen, step)` runs the official protocol (training/evaluation.py) on the
held-out synthetic clips with DeltaWorld (N sampled futures per clip: 'best' = the sample closest to the
truth at the last predicted frame, 'mean' = the mean of the N samples' features) and the copy-last baseline,
then writes to `config.eval.results_dir`:
  demo_results.json  every number (per dataset / model / context+horizon / selection / predicted step)
  demo_results.md    the headline table, then the paper's claim checked on this run (best < mean < copy-last),
                     and whether the frozen DeltaTok's token carries the change at all (token_use below)
  demo_futures.png   for a few clips: the true frames (context + future), then DeltaWorld's best, mean and
                     individual sampled futures as pictures (the pixel-patch VFM's features ARE pixels)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from deltaworld_jax import objectives
from deltaworld_jax.evaluation import pictures, protocol as evaluation

RESULTS_NAME = "demo_results"
PICTURE_NAME = "demo_futures.png"


# The margins every verdict in demo_results.md is held to (a difference of 1e-5 is noise, not a finding):
# the tokenizer's decoder "reads its token" when the pair's own token reconstructs at least 25% better than
# another clip's; the paper's point shows when best-of-N beats mean-of-N by at least 5% and both beat copy-last
# by at least 5%, at every predicted horizon.
TOKEN_MARGIN = 0.25
BEST_VS_MEAN_MARGIN = 0.05
VS_COPY_MARGIN = 0.05


def gain(loss: float, reference: float) -> float:
    """How much lower `loss` is than `reference`, as a fraction of `reference` (0.25 = 25% better)."""
    return 1.0 - loss / reference if reference > 0 else float("nan")


def claim_rows(results: dict, model: str = "deltaworld", baseline: str = "copy_last") -> list[dict]:
    """Per context/horizon setting: the eval loss (the evaluation criterion on VFM features, mean over the predicted
    frames) of best-of-N, mean-of-N and copy-last, their gains, and whether the margins hold: best-of-N at least
    BEST_VS_MEAN_MARGIN better than mean-of-N, both at least VS_COPY_MARGIN better than copy-last."""
    rows = []
    for dataset, models in results.items():
        if model not in models or baseline not in models:
            continue
        for setting, selections in sorted(models[model].items(), key=lambda kv: int(kv[0].split("_h")[1])):
            best = selections.get("best", {}).get("loss", float("nan"))
            mean = selections["mean"]["loss"]
            copy = models[baseline].get(setting, {}).get("mean", {}).get("loss", float("nan"))
            best_vs_mean, mean_vs_copy = gain(best, mean), gain(mean, copy)
            best_vs_copy = gain(best, copy)
            # NaN compares False: a missing number never passes.
            holds = bool(best_vs_mean >= BEST_VS_MEAN_MARGIN and mean_vs_copy >= VS_COPY_MARGIN
                         and best_vs_copy >= VS_COPY_MARGIN)
            rows.append(dict(dataset=dataset, setting=setting, best=best, mean=mean, copy_last=copy,
                             best_vs_mean=best_vs_mean, mean_vs_copy=mean_vs_copy, best_vs_copy=best_vs_copy,
                             holds=holds))
    return rows


def claim_markdown(rows: list[dict]) -> str:
    lines = ["| dataset | setting | best-of-N loss | mean-of-N loss | copy-last loss | best vs mean | mean vs copy-last "
             f"| margins met (>= {100 * BEST_VS_MEAN_MARGIN:.0f}%, >= {100 * VS_COPY_MARGIN:.0f}%) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['setting']} | {r['best']:.4f} | {r['mean']:.4f} | {r['copy_last']:.4f} "
                     f"| {100 * r['best_vs_mean']:.1f}% | {100 * r['mean_vs_copy']:.1f}% "
                     f"| {'yes' if r['holds'] else 'NO'} |")
    shows = bool(rows) and all(r["holds"] for r in rows)
    lines += ["", f"DeltaWorld {'shows' if shows else 'does NOT show'} the paper's point on this run: best-of-N "
              f"{'beats' if shows else 'does NOT beat'} mean-of-N by at least {100 * BEST_VS_MEAN_MARGIN:.0f}% with "
              f"both at least {100 * VS_COPY_MARGIN:.0f}% better than copy-last at every horizon"
              + ("." if shows else f" (missed at: {', '.join(r['setting'] for r in rows if not r['holds']) or 'all'}).")]
    return "\n".join(lines) + "\n"


def token_use(tokenizer: Any, feats_btnd: Any, grid_hw: tuple[int, int], criterion) -> dict[str, float] | None:
    """Does the delta token carry the change? DeltaTok reconstructs every next frame of the clips from the
    frame before it with (a) the pair's own token, (b) the token of the same step of ANOTHER clip, and
    (c) no model (copy the previous frame). own < other-clip means the decoder reads its token; own ~
    other-clip means it ignores it (its gain over copy-last is then a blur, and DeltaWorld's sampled
    futures, decoded by it, cannot differ). Mean criterion over pixels and pairs; None for one clip."""
    b, t = feats_btnd.shape[:2]
    if b < 2 or t < 2:
        return None
    own, other, copy = _token_errors(tokenizer, jnp.asarray(feats_btnd, jnp.float32), tuple(grid_hw), criterion)
    return {"own_token": float(own), "other_clip_token": float(other), "copy_last": float(copy)}


@nnx.jit(static_argnums=(2, 3))
def _token_errors(tokenizer: Any, feats: Any, grid_hw: tuple[int, int], criterion) -> tuple[Any, Any, Any]:
    """token_use's three errors in one compiled program (eager, its encoder and two decoder passes would
    compile op by op: about a hundred small compiles, seconds of every demo run)."""
    t, n, d = feats.shape[1:]
    prev, cur = feats[:, :-1].reshape(-1, n, d), feats[:, 1:].reshape(-1, n, d)
    rope = tokenizer.rope(grid_hw)
    tokens = tokenizer.encode(prev, cur, rope)
    other = jnp.roll(tokens, t - 1, axis=0)  # pairs are clip-major: the same step of the previous clip

    def error(pred):
        return jnp.mean(criterion(pred, cur))

    return error(tokenizer.decode(tokens, prev, rope)), error(tokenizer.decode(other, prev, rope)), error(prev)


def token_reads(use: dict[str, float]) -> bool:
    """The verdict: the own token reconstructs at least TOKEN_MARGIN better than another clip's."""
    return bool(gain(use["own_token"], use["other_clip_token"]) >= TOKEN_MARGIN)


def token_use_markdown(use: dict[str, float]) -> str:
    own_gain = gain(use["own_token"], use["other_clip_token"])
    verdict = ("reads its token" if token_reads(use) else "does NOT read its token")
    return ("| decoder input | reconstruction loss |\n|---|---|\n"
            f"| the pair's own delta token | {use['own_token']:.4f} |\n"
            f"| another clip's token (same step) | {use['other_clip_token']:.4f} |\n"
            f"| none: copy the previous frame | {use['copy_last']:.4f} |\n\n"
            f"The decoder {verdict}: the own token is {100 * own_gain:.1f}% better than another clip's "
            f"(margin: at least {100 * TOKEN_MARGIN:.0f}%).\n")


DISPLAY_SIZE = 96  # small frames are enlarged (nearest neighbour, pixels stay sharp) to about this size


def _pixels(vfm: Any, feats_tnd: np.ndarray, grid_hw: tuple[int, int]) -> list[np.ndarray]:
    """Pixel-patch features [T, N, D] -> float pictures in [0, 1], enlarged for display."""
    frames = pictures.pixel_frames(vfm, feats_tnd, grid_hw)
    scale = max(1, DISPLAY_SIZE // max(frames.shape[1:3]))
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    return [pictures.frame_image(f) for f in frames]


def futures_rows(output: dict, vfm: Any, clip: int, samples_shown: int) -> tuple[list[list], list[str]]:
    """Rows of one clip: truth (context + true future frames), best, mean, then `samples_shown` samples."""
    forecast, grid_hw = output["forecast"], tuple(output["clip"].grid_hw)
    context = np.asarray(forecast.context[clip])
    truth = np.asarray(forecast.targets[clip])
    futures = {}
    if "best" in output["selections"]:
        futures["best of N"] = _pixels(vfm, np.asarray(output["selections"]["best"][0][clip]), grid_hw)
    futures["mean of N"] = _pixels(vfm, np.asarray(output["selections"]["mean"][0][clip]), grid_hw)
    rollouts = np.asarray(forecast.rollouts[clip])
    for s in range(min(samples_shown, rollouts.shape[0])):
        futures[f"sample {s}"] = _pixels(vfm, rollouts[s], grid_hw)
    return pictures.forecast_rows(_pixels(vfm, context, grid_hw), _pixels(vfm, truth, grid_hw), futures)


def sample_spread(output: dict) -> np.ndarray:
    """Per clip: how different the sampled futures are (mean std over samples of the last predicted frame)."""
    last = np.asarray(output["forecast"].rollouts[:, :, -1], np.float32)  # [B, S, N, D]
    return last.std(axis=1).mean(axis=(-2, -1))


def uncertain_futures_picture(outputs: list[dict], vfm: Any, num_clips: int,
                              samples_shown: int) -> np.ndarray | None:
    """uint8 picture of the longest-horizon DeltaWorld forecast for the `num_clips` clips of the batch whose
    sampled futures differ the most (where the world is uncertain), one block of rows per clip."""
    world = [o for o in outputs if o["model"] == "deltaworld"]
    if not world:
        return None
    output = max(world, key=lambda o: o["horizon"])
    clips = np.argsort(-sample_spread(output))[:num_clips]
    rows, names = [], []
    for clip in clips:
        clip_rows, clip_names = futures_rows(output, vfm, int(clip), samples_shown)
        rows += clip_rows
        names += [f"clip {int(clip)}: {n}" if i == 0 else n for i, n in enumerate(clip_names)]
    return pictures.grid_with_row_names(rows, names, max_cell=DISPLAY_SIZE)


CRITERION_NAMES = {"": "the models' own criterion (smooth-L1, beta 0.1)", "smooth_l1": "smooth-L1 (beta 0.1)",
                   "mse": "squared error", "log_cosh": "log-cosh"}


def write_demo_results(results: dict, results_dir: str, picture: np.ndarray | None, step: int,
                       criterion: str = "", tokens: dict[str, float] | None = None) -> dict[str, str]:
    """demo_results.json / .md and demo_futures.png in `results_dir`; returns their paths."""
    json_path, md_path = evaluation.write_results(results, results_dir, name=RESULTS_NAME)
    rows = claim_rows(results)
    with open(json_path) as f:
        everything = json.load(f)
    everything["claim"] = rows
    everything["step"] = step
    if tokens is not None:
        everything["token_use"] = tokens
    with open(json_path, "w") as f:
        json.dump(everything, f, indent=2, sort_keys=True)
    table = open(md_path).read()
    with open(md_path, "w") as f:
        f.write(f"# DeltaWorld demo: evaluation after {step} steps\n\n"
                f"Eval loss = {CRITERION_NAMES.get(criterion, criterion)} between predicted and true VFM features "
                "(pixel patches, and the pixel VFM's fixed position channels, which copy-last reproduces exactly), "
                "mean over the predicted frames; N sampled futures per clip.\n\n"
                "## best-of-N vs mean-of-N vs copy-last\n\n" + claim_markdown(rows) +
                ("\n## DeltaTok: does the token carry the change? (all frame pairs of the first batch)\n\n" +
                 token_use_markdown(tokens) if tokens is not None else "") +
                "\n## All results (loss: mean over the horizon; scored frame: the last)\n\n" + table)
    paths = {"json": json_path, "markdown": md_path}
    if picture is not None:
        paths["png"] = pictures.write_png(picture, os.path.join(results_dir, PICTURE_NAME))
    return paths


TOKEN_CHECK_NAME = "token_check.jsonl"


def evaluate_tokenizer(config, trainable: Any, frozen: Any, step: int) -> dict[str, float]:
    """The trainer's evaluation hook of the demo's DeltaTok stage (every config.eval.every_steps): the token
    check of token_use() on all frame pairs of the first batch of held-out synthetic clips, logged and
    appended as one JSON line {step, own_token, other_clip_token, copy_last, own_vs_other} to
    <results_dir>/token_check.jsonl, so a run shows WHEN the token switches on (benchmarks/demo_seeds.py
    reads the file)."""
    from deltaworld_jax.data import make_eval_iterator

    settings = config.eval
    vfm = frozen
    batch = next(iter(make_eval_iterator(config.data, "synthetic", process_index=jax.process_index(),
                                         process_count=jax.process_count())))
    frames = jnp.asarray(batch["frames"])
    feats = evaluation.vfm_features(vfm, frames)
    grid_hw = vfm.grid_hw(frames.shape)
    criterion = objectives.LOSSES[settings.get("criterion", "") or "mse"]
    use = token_use(trainable, feats, grid_hw, criterion)
    if use is None:
        return {}
    use["own_vs_other"] = gain(use["own_token"], use["other_clip_token"])
    logging.info("Token check at step %d: own token %.4f  another clip's token %.4f  copy-last %.4f  "
                 "(own %.1f%% better than other; reads its token at >= %.0f%%: %s)", step, use["own_token"],
                 use["other_clip_token"], use["copy_last"], 100 * use["own_vs_other"], 100 * TOKEN_MARGIN,
                 token_reads(use))
    results_dir = settings.get("results_dir", "")
    if results_dir and jax.process_index() == 0:
        os.makedirs(results_dir, exist_ok=True)
        with open(os.path.join(results_dir, TOKEN_CHECK_NAME), "a") as f:
            f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in use.items()}}) + "\n")
    return {f"token_use/{k}": float(v) for k, v in use.items()}


def evaluate_demo(config, trainable: Any, frozen: Any, step: int) -> dict[str, Any]:
    """The trainer's evaluation hook for configs/demo.py (config.eval.fn = 'deltaworld_jax.demo:evaluate_demo')."""
    from deltaworld_jax.data import make_eval_iterator

    settings = config.eval
    results_dir = settings.get("results_dir", "")
    if not results_dir:
        raise ValueError("config.eval.results_dir is empty: the demo writes its results and pictures there")
    forecasters, vfm = evaluation.forecasters_for(config.model.kind, trainable, frozen,
                                                  num_samples=int(settings.get("num_samples", 0)) or None)
    criterion = settings.get("criterion", "")
    if criterion:  # score (and pick 'best') with another criterion than the models' training loss
        if criterion not in objectives.LOSSES:
            raise ValueError(f"config.eval.criterion={criterion!r}: expected one of {sorted(objectives.LOSSES)}")
        forecasters = [dataclasses.replace(f, criterion=objectives.LOSSES[criterion]) for f in forecasters]
    if not hasattr(vfm, "patches_to_frames"):
        raise ValueError("the demo draws predicted features as pictures: it needs the pixel-patch VFM "
                         "(config.vfm.kind = 'pixel')")
    data = {"synthetic": make_eval_iterator(config.data, "synthetic", process_index=jax.process_index(),
                                            process_count=jax.process_count())}
    picture: list[np.ndarray | None] = [None]
    tokens: list[dict | None] = [None]
    score = forecasters[0].criterion

    def draw(dataset: str, index: int, outputs: list[dict]) -> None:
        if index == 0 and jax.process_index() == 0:
            picture[0] = uncertain_futures_picture(outputs, vfm, int(settings.get("num_pictures", 4)),
                                                   int(settings.get("samples_shown", 4)))
            if config.model.kind == "deltaworld" and outputs:
                longest = max(outputs, key=lambda o: o["horizon"])
                forecast = longest["forecast"]
                feats = jnp.concatenate([jnp.asarray(forecast.context), jnp.asarray(forecast.targets)], axis=1)
                tokens[0] = token_use(frozen["tokenizer"], feats, tuple(longest["clip"].grid_hw), score)

    logging.info("Demo evaluation at step %d on %d synthetic clips", step, config.data.eval.num_synthetic_clips)
    results = evaluation.evaluate(forecasters, vfm, data, {}, settings, on_batch=draw)
    if jax.process_index() == 0:
        paths = write_demo_results(results, results_dir, picture[0], step, criterion, tokens[0])
        if tokens[0] is not None:
            logging.info("DeltaTok reconstruction: own token %.4f  another clip's token %.4f  copy-last %.4f",
                         tokens[0]["own_token"], tokens[0]["other_clip_token"], tokens[0]["copy_last"])
        for row in claim_rows(results):
            logging.info("%s %s: best-of-N %.4f  mean-of-N %.4f  copy-last %.4f  (best < mean < copy-last: %s)",
                         row["dataset"], row["setting"], row["best"], row["mean"], row["copy_last"], row["holds"])
        logging.info("Demo results: %s", paths)
    out = evaluation.flatten_results(results)
    if tokens[0] is not None:
        out.update({f"token_use/{k}": v for k, v in tokens[0].items()})
    if picture[0] is not None:
        out["futures"] = picture[0]
    return out
