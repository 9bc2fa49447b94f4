"""The embedded demo end to end, through the README's command with the reduced setting:

    python -m deltaworld_jax.main --config=configs/demo.py:quick --workdir=<tmp>

trains DeltaTok then DeltaWorld (a few steps each) on the synthetic world and must write the metrics
table (JSON + Markdown) and the PNG of sampled futures, and report progress while it runs. Whether the
full-length demo shows the paper's point is measured in benchmarks/demo.md (benchmarks/demo_seeds.py), not
here; the verdicts' margins are tested here on hand-made numbers."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

# command_env: the runs of the demo recipe here and test_colabs.py's quickstart compile the same programs and
# share them through the tests' compilation cache; DEMO_RECIPE_PROGRAMS runs them on one xdist worker, so one
# always runs after the other.
from conftest import DEMO_RECIPE_PROGRAMS, command_env

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = DEMO_RECIPE_PROGRAMS


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    env = command_env()
    proc = subprocess.run([sys.executable, "-m", "deltaworld_jax.main", "--config=configs/demo.py:quick",
                           f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return workdir, proc.stdout + proc.stderr


def test_demo_trains_both_stages_and_reports_progress(demo_run):
    workdir, log = demo_run
    for stage in ("deltatok", "deltaworld"):
        assert "Stage %s: training" % stage in log
        assert (workdir / stage / "checkpoints" / "2").is_dir(), f"{stage} has no final checkpoint"
    assert "steps/s" in log and "ETA" in log  # progress while it runs
    # TensorBoard's view of each stage: the training loss and the progress, as TensorBoard reads them.
    from test_writers import read_events

    for stage in ("deltatok", "deltaworld"):
        events = read_events(workdir / stage)
        assert [e.step for e in events.Scalars("loss")] == [1, 2] and events.Scalars("steps_per_sec")


def test_demo_writes_metrics_table(demo_run):
    workdir, _ = demo_run
    results = json.loads((workdir / "demo_results.json").read_text())
    world, copy = results["synthetic"]["deltaworld"], results["synthetic"]["copy_last"]
    for setting, steps in (("c4_h1", 1), ("c4_h3", 3)):
        for selection in ("best", "mean"):
            entry = world[setting][selection]
            assert sorted(k for k in entry if k.startswith("t")) == [f"t{i}" for i in range(steps)]
            assert np.isfinite(entry["loss"]) and entry["loss"] >= 0
        assert np.isfinite(copy[setting]["mean"]["loss"])
    claim = {row["setting"]: row for row in results["claim"]}
    assert set(claim) == {"c4_h1", "c4_h3"}
    assert claim["c4_h3"]["copy_last"] == pytest.approx(copy["c4_h3"]["mean"]["loss"])
    assert claim["c4_h3"]["best"] == pytest.approx(world["c4_h3"]["best"]["loss"])
    markdown = (workdir / "demo_results.md").read_text()
    assert "| synthetic | c4_h1 |" in markdown and "| synthetic | c4_h3 |" in markdown
    assert "| synthetic | copy_last | mean | c4_h3 | t2 |" in markdown
    # The tokenizer check on the first batch (8 clips of 7 frames: 48 pairs), in the same criterion.
    use = results["token_use"]
    assert set(use) == {"own_token", "other_clip_token", "copy_last"} and all(np.isfinite(v) for v in use.values())
    assert "## DeltaTok: does the token carry the change?" in markdown
    assert f"| the pair's own delta token | {use['own_token']:.4f} |" in markdown


class _ShiftTokenizer(nnx.Module):
    """A stand-in DeltaTok (an nnx Module, as the real one: token_use compiles it) whose token is the
    (global) feature shift between two frames: its decoder reads the token exactly (`reads=True`) or ignores
    it (`reads=False`): it copies, plus 1e-5 times the token, so that the own token is better than another
    clip's by a difference of ~1e-5, which a verdict without a margin would call reading."""

    def __init__(self, reads: bool):
        self.reads = reads

    def rope(self, grid_hw):
        return None

    def encode(self, prev, cur, rope):
        return (cur - prev).mean(axis=1, keepdims=True)

    def decode(self, token, prev, rope):
        return prev + token if self.reads else prev + 1e-5 * token


def test_token_use_verdict_needs_its_margin():
    import jax.numpy as jnp

    from deltaworld_jax import objectives
    from deltaworld_jax.evaluation import demo

    # 3 clips x 4 frames x 2 patches x 4 dims; each clip shifts by its own constant per step.
    shifts = np.array([1.0, -2.0, 0.5])[:, None, None, None]
    feats = np.cumsum(np.broadcast_to(shifts, (3, 4, 2, 4)), axis=1).astype(np.float32)
    reads = demo.token_use(_ShiftTokenizer(True), jnp.asarray(feats), (1, 2), objectives.LOSSES["mse"])
    assert reads["own_token"] == pytest.approx(0.0, abs=1e-10)
    assert reads["copy_last"] == pytest.approx(np.mean(shifts ** 2))
    # The token of the SAME step of another clip: clip 0 gets clip 2's shift, 1 gets 0's, 2 gets 1's.
    assert reads["other_clip_token"] == pytest.approx(np.mean([(1 - 0.5) ** 2, (-2 - 1) ** 2, (0.5 + 2) ** 2]))
    assert demo.token_reads(reads)
    assert "The decoder reads its token: the own token is 100.0% better" in demo.token_use_markdown(reads)
    blind = demo.token_use(_ShiftTokenizer(False), jnp.asarray(feats), (1, 2), objectives.LOSSES["mse"])
    # Own is better than other, but only by ~1e-5 of the loss: the margin (25%) says it does not read.
    assert blind["own_token"] < blind["other_clip_token"]
    assert blind["other_clip_token"] - blind["own_token"] < 1e-4 * blind["copy_last"]
    assert not demo.token_reads(blind)
    markdown = demo.token_use_markdown(blind)
    assert "The decoder does NOT read its token: the own token is 0.0% better" in markdown
    assert "at least 25%" in markdown
    assert demo.token_use(_ShiftTokenizer(True), jnp.asarray(feats[:1]), (1, 2), objectives.LOSSES["mse"]) is None


def test_claim_verdict_needs_its_margins():
    from deltaworld_jax.evaluation import demo

    def results(best, mean, copy):
        return {"synthetic": {"deltaworld": {"c4_h1": {"best": {"loss": best}, "mean": {"loss": mean}},
                                             "c4_h3": {"best": {"loss": 0.30}, "mean": {"loss": 0.40}}},
                              "copy_last": {"c4_h1": {"mean": {"loss": copy}}, "c4_h3": {"mean": {"loss": 0.70}}}}}

    shows = demo.claim_rows(results(0.29, 0.33, 0.52))  # 12% better than mean, 37% better than copy
    assert [r["holds"] for r in shows] == [True, True]
    assert shows[0]["best_vs_mean"] == pytest.approx(1 - 0.29 / 0.33)
    assert "DeltaWorld shows the paper's point" in demo.claim_markdown(shows)
    # The run: best-of-8 0.3369 vs mean-of-8 0.3370 is "best < mean < copy-last", but not by 5%.
    blur = demo.claim_rows(results(0.3369, 0.3370, 0.5259))
    assert [r["holds"] for r in blur] == [False, True]
    markdown = demo.claim_markdown(blur)
    assert "| synthetic | c4_h1 | 0.3369 | 0.3370 | 0.5259 | 0.0% | 35.9% | NO |" in markdown
    assert "does NOT show the paper's point" in markdown and "(missed at: c4_h1)" in markdown
    # Better than mean by 10% but not better than copy-last: no.
    assert not demo.claim_rows(results(0.45, 0.50, 0.46))[0]["holds"]
    assert not demo.claim_rows(results(float("nan"), 0.50, 0.80))[0]["holds"]


def test_demo_writes_picture_of_sampled_futures(demo_run):
    workdir, _ = demo_run
    image = np.asarray(Image.open(workdir / "demo_futures.png"))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    # quick: 2 clips x (truth, best, mean, 2 samples) rows of 4 context + 3 future cells, 32x32 frames
    # shown 3x enlarged.
    rows, cols, cell = 2 * 5, 7, 96
    assert image.shape[0] == rows * cell and image.shape[1] > cols * cell  # + the strip of row names
    grid = image[:, -cols * cell:]
    truth_future = grid[:cell, 4 * cell:]
    assert truth_future.std() > 0  # frames, not an empty cell
    assert grid[cell:2 * cell, :4 * cell].max() == 0  # predicted rows leave the context cells empty
    assert grid[cell:2 * cell, 4 * cell:].std() > 0  # the best future is drawn


def test_the_same_command_twice_gives_the_same_numbers(demo_run, tmp_path):
    """Determinism: the README's command run again in a fresh workdir reproduces every number bit for bit (the
    token check, the whole results table). What makes it so: Grain reads in the main process (num_workers=0)
    in a fixed order from seeded generators, every random draw comes from the config's seed, and XLA:CPU runs
    a compiled program in a fixed order on a given machine. The second run reuses the first run's compiled
    programs (the tests' compilation cache) to keep the test short; compiling the same program again gives the
    same executable."""
    first, _ = demo_run
    second = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-m", "deltaworld_jax.main", "--config=configs/demo.py:quick",
                           f"--workdir={second}"], cwd=REPO, env=command_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert (second / "token_check.jsonl").read_text().splitlines()[0] == \
        (first / "token_check.jsonl").read_text().splitlines()[0]
    again, before = json.loads((second / "demo_results.json").read_text()), json.loads((first / "demo_results.json").read_text())
    assert again["synthetic"] == before["synthetic"] and again["token_use"] == before["token_use"]


def test_mode_eval_on_the_demo_recipe_evaluates_each_stage_that_declares_one(demo_run):
    """`--mode=eval` on a config of stages: each stage's workdir, with the stage's own evaluation (the DeltaTok
    stage's is the token check, which appends to token_check.jsonl; DeltaWorld's the demo evaluation)."""
    workdir, _ = demo_run
    results = workdir / "demo_results.json"
    before = results.stat().st_mtime_ns
    checks = workdir / "token_check.jsonl"
    checks_before = len(checks.read_text().splitlines()) if checks.exists() else 0
    env = command_env()
    proc = subprocess.run([sys.executable, "-m", "deltaworld_jax.main", "--config=configs/demo.py:quick",
                           f"--workdir={workdir}", "--mode=eval"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "Stage deltatok: evaluating" in log
    assert len(checks.read_text().splitlines()) == checks_before + 1  # one more token check, on the final step
    assert "Stage deltaworld: evaluating" in log
    assert results.stat().st_mtime_ns > before  # the demo evaluation ran again on the final checkpoint
    assert "c4_h3" in json.loads(results.read_text())["synthetic"]["deltaworld"]
