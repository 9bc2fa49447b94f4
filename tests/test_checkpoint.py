"""Checkpoints: SIGKILL at any moment leaves the latest complete checkpoint restorable; SIGTERM saves and
exits cleanly; weights-only init vs full resume; retention; what a checkpoint holds; the recipe's stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from deltaworld_jax.training import checkpointing, recipe, trainer
from conftest import check_env
from test_trainer import ROOT, toy_config, toy_data

# A training subprocess: toy task, overrides as JSON in argv[2]; prints RESULT {...} at the end. Each batch
# it consumes touches <workdir>/consumed_<n> so the parent can time its signals.
TRAIN_SCRIPT = r"""
import json, os, sys
import test_trainer as T
from deltaworld_jax.training import trainer
workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
config = T.toy_config(**overrides)

def data_fn(config, **kw):
    return T.MarkingIterator(T.toy_data(config, **kw), lambda n: os.path.join(workdir, f"consumed_{n}"))

os.makedirs(workdir, exist_ok=True)
out = trainer.run(config, workdir, data_fn=data_fn)
print("RESULT" + json.dumps({"step": out["step"], "stopped_by": out["stopped_by"],
                             "losses": {str(k): v for k, v in out["losses"].items()}}))
"""


def _start(workdir, overrides):
    env = check_env()
    return subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(workdir), json.dumps(overrides)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _wait_for(predicate, proc, timeout=500):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"training subprocess ended early ({proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("timed out waiting for the training subprocess")


def test_sigkill_mid_run_resumes_from_latest_complete_checkpoint(tmp_path):
    """Saves every step (async); killed with SIGKILL as soon as a save is in flight (a *-tmp dir exists)
    after two complete checkpoints. The restarted run resumes from the latest complete one."""
    ckpt_dir = tmp_path / "checkpoints"
    proc = _start(tmp_path, {"train.num_steps": 200, "checkpoint.every_steps": 1, "checkpoint.keep_last": 5,
                             "train.write_metrics": False})

    def saving_after_two_complete():
        if not ckpt_dir.exists():
            return False
        names = os.listdir(ckpt_dir)
        return sum(n.isdigit() for n in names) >= 2 and any("tmp" in n for n in names)

    _wait_for(saving_after_two_complete, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(os.listdir(ckpt_dir))
    complete = checkpointing.checkpoint_steps(str(ckpt_dir))
    assert complete and all(str(s) in left for s in complete)
    latest = max(complete)
    print(f"SIGKILL: left {left}; complete steps {complete}; resuming from {latest}")

    resumed = trainer.run(toy_config(**{"train.num_steps": latest + 2, "checkpoint.every_steps": 1}), str(tmp_path),
                          data_fn=toy_data)
    assert sorted(resumed["losses"]) == [latest + 1, latest + 2]
    assert resumed["step"] == latest + 2
    assert not [n for n in os.listdir(ckpt_dir) if "tmp" in n]  # the unfinished save was cleaned up


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = _start(tmp_path, {"train.num_steps": 500, "checkpoint.every_steps": 1000, "train.write_metrics": False})
    _wait_for(lambda: (tmp_path / "consumed_3").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=500)
    assert proc.returncode == 0, err[-4000:]
    result = json.loads([l for l in out.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])
    assert result["stopped_by"] == "preempted" and 3 <= result["step"] < 500
    assert checkpointing.checkpoint_steps(str(tmp_path / "checkpoints")) == [result["step"]]


def test_weights_only_init_retention_and_contents(tmp_path):
    source = tmp_path / "a"
    a = trainer.run(toy_config(**{"train.num_steps": 6, "checkpoint.every_steps": 1, "checkpoint.keep_last": 2,
                                  "checkpoint.keep_period": 4}), str(source), data_fn=toy_data)
    # keep-last-2 plus every multiple of 4
    assert checkpointing.checkpoint_steps(str(source / "checkpoints")) == [4, 5, 6]
    # Only the trainable module is in a checkpoint: the frozen encoder's `patch_embed` appears nowhere.
    step_dir = source / "checkpoints" / "6"
    assert {"data_iter", "params", "train"} <= set(os.listdir(step_dir))
    blobs = b"".join(open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(step_dir) for f in fs)
    assert b"patch_embed" not in blobs and b"up_proj" in blobs

    # --mode=eval: the hook once, on the latest checkpoint's weights
    seen = {}

    def eval_fn(config, trainable, frozen, step):
        seen["kernel"] = np.asarray(trainable.head.kernel[...])
        return {"score": float(step)}

    evaluated = trainer.run(toy_config(), str(source), mode="eval", eval_fn=eval_fn)
    assert evaluated["step"] == 6 and evaluated["eval"] == {"score": 6.0}
    np.testing.assert_array_equal(seen["kernel"], np.asarray(a["state"].params["head"]["kernel"]))

    # Weights-only init: new run, step 0, fresh optimiser. With warm-up the first update has lr 0, so its
    # parameters after one step are exactly the source's final ones (a restored optimiser state would
    # have count 6 and move them).
    b = trainer.run(toy_config(**{"train.num_steps": 1, "train.init_from": str(source / "checkpoints")}),
                    str(tmp_path / "b"), data_fn=toy_data)
    assert b["step"] == 1
    np.testing.assert_array_equal(np.asarray(b["state"].params["head"]["kernel"]),
                                  np.asarray(a["state"].params["head"]["kernel"]))
    from deltaworld_jax.training.optimizer import update_count
    assert int(update_count(b["state"].opt_state)) == 1


def _toy_recipe():
    config = toy_config()
    config.stages = ["first", "second", "cooldown"]
    first = toy_config(**{"train.num_steps": 2})
    second = toy_config(**{"train.num_steps": 2, "train.init_from": "@first", "optim.lr": 1e-3})
    cooldown = toy_config(**{"train.num_steps": 4, "train.resume_from": "@second", "optim.lr": 1e-4})
    import ml_collections

    config.stage_configs = ml_collections.ConfigDict({"first": first, "second": second, "cooldown": cooldown})
    return config


def test_recipe_runs_stages_in_order_and_skips_finished_ones(tmp_path):
    config = _toy_recipe()
    results = recipe.run_recipe(config, str(tmp_path), data_fn=toy_data)
    assert results == {"first": {"skipped": False, "step": 2, "stopped_by": "done"},
                       "second": {"skipped": False, "step": 2, "stopped_by": "done"},
                       "cooldown": {"skipped": False, "step": 4, "stopped_by": "done"}}
    # the cool-down resumed the second stage's full state (steps 3-4 only), the second stage started afresh
    assert checkpointing.checkpoint_steps(str(tmp_path / "cooldown" / "checkpoints"))[-1] == 4
    again = recipe.run_recipe(config, str(tmp_path), data_fn=toy_data)
    assert all(r["skipped"] for r in again.values())


def test_recipe_rejects_unknown_stage_and_forward_reference():
    config = _toy_recipe()
    config.stages = ["first", "nope"]
    with pytest.raises(ValueError, match="Unknown stage 'nope'"):
        recipe.validate_recipe(config)
    config.stages = ["second", "first"]
    with pytest.raises(ValueError, match="must name an EARLIER stage"):
        recipe.validate_recipe(config)


def _break(step_dir, how: str) -> None:
    """Damage a saved step the way storage does: truncated / deleted / bit-flipped array file, or the step
    directory left empty."""
    import shutil

    arrays = sorted((os.path.join(d, f) for d, _, fs in os.walk(step_dir / "params") for f in fs
                     if os.sep + "d" + os.sep in os.path.join(d, f)), key=os.path.getsize)
    target = arrays[-1]  # the largest array data file
    data = open(target, "rb").read()
    if how == "truncated":  # and no manifest (killed before it was written): Orbax's own read error
        open(target, "wb").write(data[: len(data) // 2])
        os.remove(step_dir / checkpointing.CHECKSUMS)
    elif how == "deleted":
        os.remove(target)
    elif how == "bit_flip":  # the middle of the data: Orbax alone restores it silently with a wrong value
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x10
        open(target, "wb").write(bytes(flipped))
    elif how == "empty_dir":
        shutil.rmtree(step_dir)
        os.mkdir(step_dir)


def test_unreadable_newest_checkpoint_falls_back_and_is_moved_aside(tmp_path):
    """Each of four damages to the newest step (3): restoring falls back to step 2 (its exact state), the
    broken step is moved aside to 3.broken-<time> with its files, nothing is deleted; a run resumed this way
    repeats the uninterrupted run's losses exactly. With no step restorable (a changed model), it raises and
    moves nothing."""
    import shutil

    import jax

    base = tmp_path / "base"
    full = trainer.run(toy_config(**{"train.num_steps": 4, "checkpoint.every_steps": 1, "checkpoint.keep_last": 5}),
                       str(base), data_fn=toy_data)
    shutil.rmtree(base / "checkpoints" / "4")  # the run as it was after step 3
    assert all((base / "checkpoints" / str(s) / checkpointing.CHECKSUMS).exists() for s in (1, 2, 3))
    setup = trainer.build(toy_config())
    reference = checkpointing.Checkpointer(str(base / "checkpoints"), save_every=1)
    step2 = jax.tree.map(np.asarray, reference.restore(setup.abstract_state, setup.state_shardings, step=2))
    reference.close()

    for how in ("truncated", "deleted", "bit_flip", "empty_dir"):
        workdir = tmp_path / how
        shutil.copytree(base / "checkpoints", workdir / "checkpoints")
        _break(workdir / "checkpoints" / "3", how)
        files_before = sorted(os.path.relpath(os.path.join(d, f), workdir / "checkpoints" / "3")
                              for d, _, fs in os.walk(workdir / "checkpoints" / "3") for f in fs)
        if how == "bit_flip":
            assert checkpointing.verify_checksums(workdir / "checkpoints" / "3").endswith("(corrupted)")
        if how == "deleted":  # the whole run: resumes from step 2, same losses as the uninterrupted run
            resumed = trainer.run(toy_config(**{"train.num_steps": 4, "checkpoint.every_steps": 1}), str(workdir),
                                  data_fn=toy_data)
            assert sorted(resumed["losses"]) == [3, 4]
            assert all(resumed["losses"][s] == full["losses"][s] for s in (3, 4)), (resumed["losses"], full["losses"])
        else:
            checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"), save_every=1)
            state = checkpointer.restore_latest(setup.abstract_state, setup.state_shardings)
            assert checkpointer.all_steps() == [1, 2]
            checkpointer.close()
            for a, b in zip(jax.tree.leaves(step2), jax.tree.leaves(state)):
                np.testing.assert_array_equal(np.asarray(b), a)
        aside = [n for n in os.listdir(workdir / "checkpoints") if n.startswith("3.broken-")]
        assert len(aside) == 1, (how, os.listdir(workdir / "checkpoints"))
        files_after = sorted(os.path.relpath(os.path.join(d, f), workdir / "checkpoints" / aside[0])
                             for d, _, fs in os.walk(workdir / "checkpoints" / aside[0]) for f in fs)
        assert sorted(files_before + ["BROKEN.txt"]) == files_after, how  # nothing deleted
        print(how, "->", open(workdir / "checkpoints" / aside[0] / "BROKEN.txt").read().strip())

    # Nothing restores (another model width): an error naming the newest step; nothing is moved.
    wide = trainer.build(toy_config(**{"model.width": 48}))
    checkpointer = checkpointing.Checkpointer(str(base / "checkpoints"), save_every=1)
    with pytest.raises(RuntimeError, match="No checkpoint .* restores .*newest step 3"):
        checkpointer.restore_latest(wide.abstract_state, wide.state_shardings)
    checkpointer.close()
    assert sorted(os.listdir(base / "checkpoints")) == ["1", "2", "3"]
