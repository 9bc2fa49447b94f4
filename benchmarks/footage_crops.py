"""Which --crop forecasts real footage best: the folder evaluation of deltaworld_jax.forecast for each crop and
several start times, one table of errors relative to copy-last (benchmarks/footage.md has the run and results).

    python benchmarks/footage_crops.py --videos=DIR --tokenizer=RUN/deltatok --world=RUN/deltaworld \
        [--vfm=pixel --patch_size=4 --position_channels=16 --world_num_heads=2 --world_rope_axis_sizes=28] \
        [--size=32] [--num_samples=8] [--starts=0,0.3,0.6,0.9] [--out=/tmp/footage_crops]

Errors of different crops cover different pixels (the centre square is the easiest part of a wide frame to
predict or not), so crops are compared by their error RELATIVE to copy-last on the same crop: the share of
copy-last's error that the forecast removes. Each clip is one (video, start) pair; per clip and crop the
ratio best / copy-last and mean / copy-last at the last step of horizon 3 (and of horizon 1).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

from deltaworld_jax import forecast
from deltaworld_jax.forecast import folder

_STARTS = flags.DEFINE_list("starts", ["0", "0.3", "0.6", "0.9"], "Clip starts (s after each video's first frame).")
_CROPS = flags.DEFINE_list("crops", list(forecast.CROPS), "Crops to compare.")


def main(argv):
    del argv
    f = flags.FLAGS
    models = forecast.load_models(f.vfm, f.tokenizer, f.world, patch_size=f.patch_size,
                                  position_channels=f.position_channels, world_num_heads=f.world_num_heads,
                                  world_rope_axis_sizes=f.world_rope_axis_sizes,
                                  world_rope_unrotated_size=f.world_rope_unrotated_size)
    ratios: dict[str, dict[str, list[float]]] = {}
    absolute: dict[str, dict[str, list[float]]] = {}
    for crop in _CROPS.value:
        for start in (float(s) for s in _STARTS.value):
            out = os.path.join(f.out, f"{crop}_start{start:g}")
            paths = folder.run_folder(videos=f.videos, out=out, vfm=f.vfm, tokenizer=f.tokenizer, world=f.world,
                                      num_samples=f.num_samples, context=f.context, stride=f.stride, start=start,
                                      size=f.size, crop=crop, patch_size=f.patch_size,
                                      position_channels=f.position_channels, seed=f.seed,
                                      batch_size=f.batch_size, pictures=0, models=models)
            summary = json.loads(open(paths["summary_json"]).read())
            for row in summary["per_video"]:
                for h in (1, 3):
                    copy = row[f"h{h}_copy_last"][-1]
                    for sel in ("best", "mean"):
                        ratios.setdefault(crop, {}).setdefault(f"h{h}_{sel}", []).append(row[f"h{h}_{sel}"][-1] / copy)
                    for sel in ("best", "mean", "copy_last"):
                        absolute.setdefault(crop, {}).setdefault(f"h{h}_{sel}", []).append(row[f"h{h}_{sel}"][-1])
    print("| crop | clips | h1 best/copy | h1 mean/copy | h3 best/copy | h3 mean/copy | h3 best | h3 copy-last |")
    print("|---|---|---|---|---|---|---|---|")
    for crop, r in ratios.items():
        a = absolute[crop]
        print(f"| {crop} | {len(r['h3_best'])} | {np.mean(r['h1_best']):.3f} | {np.mean(r['h1_mean']):.3f} | "
              f"{np.mean(r['h3_best']):.3f} | {np.mean(r['h3_mean']):.3f} | {np.mean(a['h3_best']):.4f} | "
              f"{np.mean(a['h3_copy_last']):.4f} |")
    crops = list(ratios)
    for i, c1 in enumerate(crops):
        for c2 in crops[i + 1:]:
            for key in ("h3_best", "h3_mean", "h1_best"):
                d = np.asarray(ratios[c1][key]) - np.asarray(ratios[c2][key])
                print(f"{key}: {c1} - {c2} = {d.mean():+.3f} (clips where {c1} is lower: {(d < 0).sum()}/{len(d)}; "
                      f"std of the difference {d.std(ddof=1) if len(d) > 1 else 0:.3f})")
    with open(os.path.join(f.out, "crops.json"), "w") as fh:
        json.dump({"ratios": ratios, "absolute": absolute}, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
