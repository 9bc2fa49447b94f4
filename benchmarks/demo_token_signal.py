"""Why the demo's DeltaTok can ignore its token: what the token carries at initialisation.

    JAX_PLATFORMS=cpu python benchmarks/demo_token_signal.py --seeds=0,1,2,3,4

For the demo's DeltaTok stage (configs/demo.py) at initialisation, per seed, on frame pairs of the demo world,
prints:
  * change readable from the token: R^2 of a ridge regression from the initial token (64 values) to the pair's
    change (the features of the second frame minus those of the first, all patches), fitted on half of the
    pairs and scored on the other half (the best of four ridge strengths). The decoder starts from the first frame and can only learn to read
    from its token what the token already carries; near 0 means the first gradient steps have nothing
    pair-specific to reinforce. Measured for ordinary pairs (two consecutive frames) and for pairs that start
    from black (black, frame): the pair every clip's token sequence starts with, whose change is the frame.
  * order blindness: ||token(x, y) - token(y, x)|| / ||token(x, y) - token(x', y')||, how much swapping the two
    frames of a pair changes its token, relative to how much another pair's token differs. Near 0: the encoder
    cannot yet tell which frame came first, so its token holds the pair's content, not its change.
A script that prints numbers (benchmarks/demo.md has its output), not a test.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deltaworld_jax.data.pipeline import make_train_source  # noqa: E402
from deltaworld_jax import tasks  # noqa: E402


def load_demo_config(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_config", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("").stage_configs.deltatok


def frame_pairs(data_config, num_pairs: int, seed: int) -> np.ndarray:
    """[num_pairs, 2, H, W, 3] consecutive frames (one time step apart) of different world clips, none from black."""
    data_config = data_config.copy_and_resolve_references()
    data_config.synthetic.from_black_probability = 0.0
    source = make_train_source(data_config)
    steps = int(round(float(data_config.time_stride_range[0]) * source.fps))
    rng = np.random.default_rng(seed)
    pairs = []
    for index in rng.choice(10_000, size=num_pairs, replace=False):
        start = int(rng.integers(0, source.num_video_frames - steps))
        pairs.append(np.stack(source.read_frames(int(index), [start, start + steps], lambda f: f)))
    return np.stack(pairs)


def tokens_and_changes(model, vfm, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = vfm(jnp.asarray(frames))
    x, y = feats[:, 0], feats[:, 1]
    tokens = model.encode(x, y, model.rope(vfm.grid_hw(frames.shape)))[:, 0]
    return np.asarray(tokens, np.float64), np.asarray(y - x, np.float64).reshape(len(frames), -1)


# Ridge strengths tried (relative to the mean eigenvalue of the tokens' covariance); the best held-out R^2 is
# printed, which favours both cases equally.
RIDGES = (0.01, 0.1, 1.0, 10.0)


def readable_change(tokens: np.ndarray, changes: np.ndarray, ridge: float = 1e-3) -> float:
    """Held-out R^2 of the best linear map token -> change (fit on the first half, scored on the second)."""
    half = len(tokens) // 2
    t_fit, t_test = tokens[:half], tokens[half:]
    c_fit, c_test = changes[:half], changes[half:]
    t_mean, c_mean = t_fit.mean(0), c_fit.mean(0)
    a = t_fit - t_mean
    weights = np.linalg.solve(a.T @ a + ridge * np.trace(a.T @ a) / a.shape[1] * np.eye(a.shape[1]), a.T @ (c_fit - c_mean))
    residual = c_test - c_mean - (t_test - t_mean) @ weights
    return float(1.0 - np.sum(residual ** 2) / np.sum((c_test - c_test.mean(0)) ** 2))


def order_blindness(model, vfm, frames: np.ndarray) -> float:
    feats = vfm(jnp.asarray(frames))
    x, y = feats[:, 0], feats[:, 1]
    rope = model.rope(vfm.grid_hw(frames.shape))
    forward, backward = model.encode(x, y, rope), model.encode(y, x, rope)
    other = jnp.roll(forward, 1, axis=0)
    return float(jnp.linalg.norm(forward - backward) / jnp.linalg.norm(forward - other))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--config", default="configs/demo.py")
    args = p.parse_args(argv)
    config = load_demo_config(args.config)
    task = tasks.make_task(config)
    vfm = task.build_frozen()
    print("| seed | change readable from the token (R^2): ordinary pairs | pairs from black | order blindness |\n"
          "|---|---|---|---|")
    for seed in [int(s) for s in args.seeds.split(",")]:
        model = task.build_trainable(nnx.Rngs(seed))
        frames = frame_pairs(config.data, args.pairs, seed)
        from_black = frames.copy()
        from_black[:, 0] = 0
        ordinary, black = (max(readable_change(*data, ridge=r) for r in RIDGES)
                           for data in (tokens_and_changes(model, vfm, frames), tokens_and_changes(model, vfm, from_black)))
        print(f"| {seed} | {ordinary:.3f} | {black:.3f} | {order_blindness(model, vfm, frames[:64]):.3f} |", flush=True)


if __name__ == "__main__":
    main()
