"""The trainer on a small test-only Task: a real nnx model (learned token + transformer Block + head) trained
against a FROZEN nnx patch encoder, on a real Grain iterator of random clips.

Other trainer test files (sharding, checkpoint, multi-process) import ToyTask / toy_config / toy_data from
here; subprocess cases add this directory to sys.path and `import test_trainer`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from deltaworld_jax.data.pipeline import TrainIterator
from deltaworld_jax.data.sources import ERROR_KINDS
from deltaworld_jax.models import basic_layers, blocks
from deltaworld_jax import tasks
from deltaworld_jax.training import recipe, trainer
from configs import common

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PATCH = 4

# The persistent compilation cache is configured in conftest.py; check subprocesses take conftest.check_env.
from conftest import check_env  # noqa: E402


class ToyEncoder(nnx.Module):
    """Frozen 'VFM': a linear patch embedding of 4x4 patches."""

    def __init__(self, width: int, rngs: nnx.Rngs):
        self.patch_embed = basic_layers.linear(PATCH * PATCH * 3, width, axes=("vocab", "embed"), rngs=rngs)

    def __call__(self, frames):  # [B, T, H, W, 3] uint8 -> [B, T, N, D]
        b, t, h, w, c = frames.shape
        x = frames.astype(jnp.float32) / 255.0
        x = x.reshape(b, t, h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 1, 2, 4, 3, 5, 6)
        return self.patch_embed(x.reshape(b, t, (h // PATCH) * (w // PATCH), PATCH * PATCH * c))


class ToyPredictor(nnx.Module):
    """Trainable: predicts frame 1's features from frame 0's (plus a learned token and input noise)."""

    def __init__(self, width: int, dtype, rngs: nnx.Rngs):
        self.token = nnx.Param(jax.random.normal(rngs.params(), (1, width)) * 0.02, out_sharding=(None, "embed"))
        attention = blocks.AttentionConfig(hidden_size=width, num_heads=2)
        self.block = blocks.Block(blocks.BlockConfig(attention, intermediate_size=2 * width, layer_scale_init=0.1),
                                  dtype=dtype, rngs=rngs)
        self.head = basic_layers.linear(width, width, axes=("embed", "vocab"), dtype=dtype, rngs=rngs)

    def __call__(self, feats_bnd):
        b = feats_bnd.shape[0]
        tokens = jnp.concatenate([jnp.broadcast_to(self.token[...][None], (b, 1, feats_bnd.shape[-1])),
                                  feats_bnd], axis=1)
        return self.head(self.block(tokens))[:, 1:]


class ToyTask:
    name = "toy_test"

    def __init__(self, config):
        self.config = config
        self.dtype = jnp.dtype(config.model.get("dtype", "float32"))
        self.width = config.model.get("width", 32)

    def build_trainable(self, rngs):
        return ToyPredictor(self.width, self.dtype, rngs)

    def build_frozen(self):
        return ToyEncoder(self.width, nnx.Rngs(1234))

    def loss(self, trainable, frozen, batch, rng):
        feats = jax.lax.stop_gradient(frozen(batch["frames"]))
        x, y = feats[:, 0], feats[:, 1]
        if not self.config.model.get("noise_free", False):
            x = x + 0.01 * jax.random.normal(rng, x.shape)  # randomness drawn from the step's rng
        if "poison" in batch:  # tests: a non-finite loss on demand
            x = x * batch["poison"][:, None, None]
        pred = trainable(x).astype(jnp.float32)
        loss = jnp.mean((pred - y) ** 2) * self.config.model.get("loss_scale", 1.0)
        return loss, {"pred_abs": jnp.mean(jnp.abs(pred))}


tasks.TASKS["toy_test"] = ToyTask  # a test-only model family, known to the trainer like the real ones


def toy_config(**overrides) -> ml_collections.ConfigDict:
    config = common.base_config()
    config.model.kind = "toy_test"
    config.model.width = 32
    config.model.dtype = "float32"
    config.model.loss_scale = 1.0
    config.data = ml_collections.ConfigDict(dict(frame_size=8, num_frames=2, seed=7, poison_at=-1))
    config.optim.lr = 3e-3
    config.optim.warmup_steps = 2
    config.optim.grad_clip_norm = 1.0
    config.train.batch_size = 8
    config.train.num_steps = 6
    config.train.log_every_steps = 2
    config.checkpoint.every_steps = 2
    config.checkpoint.keep_last = 3
    config.checkpoint.keep_period = 0
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


class MarkingIterator(grain.DatasetIterator):
    """Passes batches through and touches `mark_path(n)` after handing out the n-th one, so a parent process
    can time its signals (SIGTERM, SIGKILL) to the data a training subprocess has consumed."""

    def __init__(self, parent, mark_path):
        super().__init__(parent)
        self.n = 0
        self._mark_path = mark_path

    errors = property(lambda self: self._parent.errors)

    def __next__(self):
        batch = next(self._parent)
        self.n += 1
        open(self._mark_path(self.n), "w").close()
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def toy_data(config, *, process_index: int, process_count: int):
    """A Grain iterator of process-local batches (each process reads only its shard of every batch) in the
    data pipeline's TrainIterator (its skipped-input counters); example i is a function of (seed, i)."""
    size = config.data.frame_size
    local_batch = config.train.batch_size // process_count
    poison_at = config.data.get("poison_at", -1)

    def example(i):
        rng = np.random.default_rng([config.data.seed, i])
        frames = rng.integers(0, 256, (config.data.num_frames, size, size, 3), dtype=np.uint8)
        step = i // config.train.batch_size
        # the loader's per-clip counts of skipped inputs by kind (here: one 'too_short' every 4th clip)
        errors = np.zeros(len(ERROR_KINDS), np.int64)
        errors[ERROR_KINDS.index("too_short")] = int(i % 4 == 0)
        return {"frames": frames, "timestamps": np.arange(config.data.num_frames, dtype=np.float32) * 0.1,
                "poison": np.float32(np.nan if step == poison_at else 1.0), "errors": errors}

    # Process p's batch k holds examples k*B + p + P*j: global batch k is examples [k*B, (k+1)*B) for ANY
    # process count, so the iterator resumes at global batch `step` on another topology (TrainIterator(build)).
    batches = grain.MapDataset.range(10**6)[process_index::process_count].map(example).batch(local_batch)
    return TrainIterator(lambda first_batch: iter(batches[first_batch:].to_iter_dataset()))


def run_python(code: str, *, devices: int = 1, env: dict | None = None, timeout: int = 240):
    """Run `code` in a fresh interpreter with `devices` fake CPU devices; returns the CompletedProcess."""
    full_env = {**check_env(devices), **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def check(proc):
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


# ----------------------------------------------------------------------------------------------------


def test_trains_and_resumes_deterministically(tmp_path):
    """Uninterrupted 6 steps vs 4 steps + a resume to 6: identical losses (same data order, same rng)."""
    full = trainer.run(toy_config(), str(tmp_path / "full"), data_fn=toy_data)
    assert full["step"] == 6 and sorted(full["losses"]) == [1, 2, 3, 4, 5, 6]
    assert full["losses"][6] < full["losses"][1]  # it learns
    assert full["counters"]["data/skipped_too_short"] == 6 * 8 / 4  # counted by the loader, logged by the trainer

    part = trainer.run(toy_config(**{"train.num_steps": 4}), str(tmp_path / "part"), data_fn=toy_data)
    assert part["step"] == 4
    resumed = trainer.run(toy_config(), str(tmp_path / "part"), data_fn=toy_data)
    assert resumed["step"] == 6 and sorted(resumed["losses"]) == [5, 6]
    for s in (1, 2, 3, 4):
        assert part["losses"][s] == full["losses"][s]
    for s in (5, 6):
        assert resumed["losses"][s] == full["losses"][s], (s, resumed["losses"][s], full["losses"][s])
    np.testing.assert_array_equal(np.asarray(resumed["state"].params["head"]["kernel"]),
                                  np.asarray(full["state"].params["head"]["kernel"]))
    print("resume check: losses", {s: full["losses"][s] for s in (5, 6)}, "equal after resume from step 4")

    again = trainer.run(toy_config(), str(tmp_path / "part"), data_fn=toy_data)  # finished: nothing to do
    assert again["stopped_by"] == "done" and again["losses"] == {} and again["step"] == 6


def test_non_finite_updates_are_skipped_counted_and_never_saved(tmp_path):
    """One poisoned batch: that update is skipped (counted), training goes on. A blow-up (lr 1e30, no clipping:
    finite but huge parameters, then NaN losses): the run stops after optim.max_consecutive_nonfinite skips in
    a row, no saved state is non-finite or gives a non-finite loss, and resuming what was kept with a sane lr
    trains finite."""
    import jax
    from deltaworld_jax.training import checkpointing
    from deltaworld_jax.training.metrics import NonFiniteLossError

    one = trainer.run(toy_config(**{"data.poison_at": 3}), str(tmp_path / "one"), data_fn=toy_data)  # 4th update
    assert one["step"] == 6 and one["nonfinite_skipped"] == 1
    assert not np.isfinite(one["losses"][4]) and all(np.isfinite(one["losses"][s]) for s in (1, 2, 3, 5, 6))

    blow_up = {"optim.lr": 1e30, "optim.grad_clip_norm": 0.0, "checkpoint.every_steps": 1, "checkpoint.keep_last": 10,
               "train.num_steps": 12, "train.log_every_steps": 1, "optim.max_consecutive_nonfinite": 3}
    with pytest.raises(NonFiniteLossError, match="3 non-finite update"):
        trainer.run(toy_config(**blow_up), str(tmp_path / "blow"), data_fn=toy_data)
    ckpt_dir = str(tmp_path / "blow" / "checkpoints")
    kept = checkpointing.checkpoint_steps(ckpt_dir)
    assert kept, "the first steps (lr 0 in warm-up) were good and must be kept"
    setup = trainer.build(toy_config(**blow_up))
    for step in kept:
        checkpointer = checkpointing.Checkpointer(ckpt_dir, save_every=1)
        state = checkpointer.restore(setup.abstract_state, setup.state_shardings, step=step)
        checkpointer.close()
        leaves = [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state))]
        assert all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.floating)), step
        assert max(float(np.max(np.abs(x))) for x in jax.tree.leaves(state.params)) < 1e3, step
    sane = trainer.run(toy_config(**{**blow_up, "optim.lr": 1e-3, "train.num_steps": max(kept) + 3}),
                       str(tmp_path / "blow"), data_fn=toy_data)
    assert sane["nonfinite_skipped"] == 0 and len(sane["losses"]) == 3
    assert all(np.isfinite(v) for v in sane["losses"].values()), sane["losses"]
    print("blow-up: kept steps", kept, "; resumed with lr 1e-3:", sane["losses"])


def test_profile_steps_write_a_trace_and_are_off_by_default(tmp_path):
    """config.train.profile_steps=2 (clu's periodic_actions.Profile): a profiler trace of steps 2-3 lands under
    <workdir>/plugins/profile/ (TensorBoard's profile tab); off by default, a run writes none."""
    assert common.base_config().train.profile_steps == 0
    plain = trainer.run(toy_config(**{"train.num_steps": 2}), str(tmp_path / "plain"), data_fn=toy_data)
    assert plain["step"] == 2 and not (tmp_path / "plain" / "plugins").exists()
    traced = trainer.run(toy_config(**{"train.num_steps": 4, "train.profile_steps": 2, "train.profile_after_steps": 1}),
                         str(tmp_path / "traced"), data_fn=toy_data)
    assert traced["step"] == 4
    traces = list((tmp_path / "traced" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, traces
    # A run that ends inside the trace window closes the trace (the next trace can start).
    short = trainer.run(toy_config(**{"train.num_steps": 2, "train.profile_steps": 5, "train.profile_after_steps": 0}),
                        str(tmp_path / "short"), data_fn=toy_data)
    assert short["step"] == 2 and list((tmp_path / "short" / "plugins" / "profile").glob("*/*.xplane.pb"))


def test_persistent_compilation_cache_is_on_for_real_runs(tmp_path, monkeypatch):
    """config.train.compilation_cache: relative -> under the workdir (the default 'jax_cache'), absolute or
    gs:// as given, '' off; a cache the caller configured (JAX_COMPILATION_CACHE_DIR, a test session) wins."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    assert common.base_config().train.compilation_cache == "jax_cache"
    assert trainer.compilation_cache_dir(toy_config(), "/w") == "/w/jax_cache"
    assert trainer.compilation_cache_dir(toy_config(**{"train.compilation_cache": "gs://b/c"}), "/w") == "gs://b/c"
    assert trainer.compilation_cache_dir(toy_config(**{"train.compilation_cache": ""}), "/w") == ""
    session = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert trainer.enable_compilation_cache(toy_config(), str(tmp_path)) == str(tmp_path / "jax_cache")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax_cache")
        assert trainer.enable_compilation_cache(toy_config(), "/elsewhere") == str(tmp_path / "jax_cache")
    finally:
        jax.config.update("jax_compilation_cache_dir", session)
        compilation_cache.reset_cache()


@pytest.mark.parametrize("overrides, message", [
    ({"model.kind": "nope"}, "Unknown config.model.kind 'nope'"),
    ({"train.batch_size": 6, "optim.accumulation_steps": 4}, "not divisible by data-parallel size 1 x "
                                                               "accumulation_steps 4"),
    ({"mesh.shape": {"data": 3, "fsdp": 1, "tensor": 1}}, "needs 3 devices"),
    ({"optim.lr": 0.0}, "optim.lr must be positive"),
    ({"model.kind": "deltaworld"}, "config.tokenizer.checkpoint"),
    ({"train.init_from": "/nonexistent/run"}, "init_from='/nonexistent/run' does not exist"),
    ({"train.profile_steps": -1}, "profile_steps and profile_after_steps must be >= 0"),
])
def test_bad_config_values_fail_before_compile(tmp_path, overrides, message, monkeypatch):
    config = toy_config(**overrides)
    if overrides.get("model.kind") == "deltaworld":
        config.tokenizer = ml_collections.ConfigDict({"checkpoint": ""})
    monkeypatch.setattr(trainer, "build", lambda *a, **k: pytest.fail("built before validating"))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        trainer.run(config, str(tmp_path), data_fn=toy_data)


def test_gradient_accumulation_matches_full_batch(tmp_path):
    """accumulation 4 over micro-batches of 2 == one batch of 8 (mean of micro-batch gradients), given the
    same randomness; and the effective batch stays config.train.batch_size."""
    base = {"train.num_steps": 2, "train.log_every_steps": 1, "model.noise_free": True}
    calls = []

    def eval_fn(config, trainable, frozen, step):  # the periodic evaluation hook (config.eval.every_steps)
        calls.append((type(trainable).__name__, type(frozen).__name__, step))
        return {"score": float(step)}

    one = trainer.run(toy_config(**base, **{"eval.every_steps": 2}), str(tmp_path / "a"), data_fn=toy_data,
                      eval_fn=eval_fn)
    assert calls == [("ToyPredictor", "ToyEncoder", 2)]
    acc = trainer.run(toy_config(**base, **{"optim.accumulation_steps": 4}), str(tmp_path / "b"), data_fn=toy_data)
    # The loss of the batch is the mean of its equally sized micro-batch losses (noise off: no rng involved).
    for s in (1, 2):
        np.testing.assert_allclose(acc["losses"][s], one["losses"][s], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(acc["state"].params["head"]["kernel"]),
                               np.asarray(one["state"].params["head"]["kernel"]), rtol=1e-4, atol=1e-6)


def _load_config_file(name: str, arg: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_kinetics_stages_are_the_papers_and_bad_values_fail_before_build(tmp_path, monkeypatch):
    expected = {  # stage: (lr, frame size, frames, final step, weight decay, clip)
        "deltatok_256": (1e-3, 256, 2, 1_000_000, 0.01, 0.01),
        "deltatok_512": (1e-4, 512, 2, 500_000, 0.01, 0.01),
        "deltatok_cooldown1": (1e-5, 512, 2, 550_000, 0.01, 0.01),
        "deltatok_cooldown2": (1e-6, 512, 2, 600_000, 0.01, 0.01),
        "deltaworld_512": (1e-4, 512, 8, 300_000, 0.4, 0.0),
        "deltaworld_cooldown": (1e-5, 512, 8, 305_000, 0.4, 0.0),
    }
    for stage, values in expected.items():
        c = _load_config_file("kinetics", f"stage={stage}")
        assert (c.optim.lr, c.data.frame_size, c.data.num_frames, c.train.num_steps, c.optim.weight_decay,
                c.optim.grad_clip_norm) == values, stage
        assert (c.train.batch_size, c.optim.warmup_steps, c.model.dtype) == (1024, 5000, "bfloat16")
    full = _load_config_file("kinetics", "recipe=all")
    recipe.validate_recipe(full)
    assert full.stage_configs.deltatok_512.train.init_from == "@deltatok_256"  # weights only
    assert full.stage_configs.deltatok_cooldown1.train.resume_from == "@deltatok_512"  # full resume
    assert full.stage_configs.deltaworld_512.tokenizer.checkpoint == "@deltatok_cooldown2"
    with pytest.raises(ValueError, match="Unknown stage 'deltatok_1024'"):
        _load_config_file("kinetics", "stage=deltatok_1024")

    monkeypatch.setattr(trainer, "build", lambda *a, **k: pytest.fail("built before validating"))
    with pytest.raises(ValueError, match="set config.train.init_from"):
        trainer.run(_load_config_file("kinetics", "stage=deltatok_512"), str(tmp_path))
    with pytest.raises(ValueError, match="DeltaWorld needs a trained tokenizer"):
        trainer.run(_load_config_file("kinetics", "stage=deltaworld_512"), str(tmp_path))
    with pytest.raises(ValueError, match="Unknown stage"):
        _load_config_file("kinetics", "stage=nope")


@pytest.mark.parametrize("batch_size", [4, 8])  # 1 and 2 examples per micro-batch: the trailing dims flattened / kept
def test_micro_batch_i_is_every_accumulation_th_example_in_the_batch_shapes(batch_size):
    from deltaworld_jax.training import train_step

    accumulation = 4
    batch = {"frames": np.arange(batch_size * 2 * 3 * 5 * 3, dtype=np.uint8).reshape(batch_size, 2, 3, 5, 3),
             "times": np.arange(batch_size * 2, dtype=np.float32).reshape(batch_size, 2)}
    micro = train_step._microbatches(batch, accumulation, None)
    flattened = batch_size // accumulation == 1
    assert micro["frames"].ndim == (3 if flattened else 6)
    for i in range(accumulation):
        one = train_step._microbatch(micro, batch, i)
        for key in batch:
            np.testing.assert_array_equal(np.asarray(one[key]), batch[key][i::accumulation])
