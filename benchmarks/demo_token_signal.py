"""Why the demo's DeltaTok can ignore its token: the learning signal that reaches the token at initialisation.

    JAX_PLATFORMS=cpu python benchmarks/demo_token_signal.py --seeds=0,1,2,3,4

For the demo's DeltaTok stage (configs/demo.py) at initialisation, per seed, on one batch of the demo world's
frame pairs, prints:
  * pair signal: the RMS over pairs of the PAIR-DEPENDENT part of d loss / d token (the gradient each pair sends
    to its own token, minus the batch mean of those gradients). The batch-mean part only moves the learned z
    embedding; the pair-dependent part is the only thing that can teach the encoder to put THIS pair's change
    into its token. Measured for ordinary pairs (two consecutive frames) and for pairs that start from black
    (black, frame): the pair every clip's token sequence starts with.
  * order blindness: ||token(x, y) - token(y, x)|| / ||token(x, y) - token(x', y')||, how much swapping the two
    frames of a pair changes its token, relative to how much another pair's token differs. Near 0: the encoder
    cannot yet tell which frame came first, so it cannot encode a change, only content.
A script that prints numbers (benchmarks/demo.md has its output), not a test.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deltaworld_jax import objectives  # noqa: E402
from deltaworld_jax.data.pipeline import make_train_source  # noqa: E402
from deltaworld_jax.training import tasks  # noqa: E402


def load_demo_config(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_config", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("").stage_configs.deltatok


def frame_pairs(data_config, num_pairs: int, seed: int) -> np.ndarray:
    """[num_pairs, 2, H, W, 3] consecutive frames (one time step apart) of different world clips."""
    source = make_train_source(data_config)
    steps = int(round(float(data_config.time_stride_range[0]) * source.fps))
    rng = np.random.default_rng(seed)
    pairs = []
    for index in rng.choice(10_000, size=num_pairs, replace=False):
        start = int(rng.integers(0, source.num_video_frames - steps))
        pairs.append(np.stack(source.read_frames(int(index), [start, start + steps], lambda f: f)))
    return np.stack(pairs)


def signal(model, vfm, frames: np.ndarray, criterion) -> tuple[float, float]:
    """(RMS of the pair-dependent part of d loss / d token, RMS of its batch mean)."""
    feats = vfm(jnp.asarray(frames))
    x, y = feats[:, 0], feats[:, 1]
    rope = model.rope(vfm.grid_hw(frames.shape))
    tokens = model.encode(x, y, rope)

    def loss(tok):
        return jnp.mean(criterion(model.decode(tok, x, rope), y))

    grads = jax.grad(loss)(tokens) * tokens.shape[0]  # per pair, as if each pair were its own batch
    mean = jnp.mean(grads, axis=0, keepdims=True)
    return float(jnp.sqrt(jnp.mean((grads - mean) ** 2))), float(jnp.sqrt(jnp.mean(mean ** 2)))


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
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--config", default="configs/demo.py")
    args = p.parse_args(argv)
    config = load_demo_config(args.config)
    task = tasks.make_task(config)
    vfm = task.build_frozen()
    criterion = objectives.LOSSES[config.model.loss_fn]
    print("| seed | pair signal, ordinary pairs | pair signal, pairs from black | ratio | batch-mean part "
          "(ordinary / from black) | order blindness |\n|---|---|---|---|---|---|")
    for seed in [int(s) for s in args.seeds.split(",")]:
        model = task.build_trainable(nnx.Rngs(seed))
        frames = frame_pairs(config.data, args.pairs, seed)
        from_black = frames.copy()
        from_black[:, 0] = 0
        ordinary, ordinary_mean = signal(model, vfm, frames, criterion)
        black, black_mean = signal(model, vfm, from_black, criterion)
        print(f"| {seed} | {ordinary:.2e} | {black:.2e} | {black / ordinary:.0f}x | {ordinary_mean:.2e} / "
              f"{black_mean:.2e} | {order_blindness(model, vfm, frames):.3f} |", flush=True)


if __name__ == "__main__":
    main()
