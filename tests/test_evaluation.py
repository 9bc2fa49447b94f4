"""The evaluation protocol: crops and label alignment (vs a torch transcription of the official functions),
which frames are context / scored, copy-last on a static video, best/mean selection, the results writer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deltaworld_jax  # noqa: F401
from conftest import check_env
from deltaworld_jax.models.heads import DepthHead, SegHead, on_patch_grid
from deltaworld_jax.data.sampling import square_crops
from deltaworld_jax.evaluation import protocol as ev
from deltaworld_jax.evaluation import forecasters

P = 4  # patch size of the tiny pixel VFM


class PixelVFM(nnx.Module):
    """Features = the patch's pixels scaled to [0, 1] (a stand-in for the pixel-patch VFM)."""

    patch_size = P

    def __call__(self, frames):
        x = jnp.asarray(frames, jnp.float32) / 255.0
        *lead, h, w, c = x.shape
        x = x.reshape(*lead, h // P, P, w // P, P, c)
        x = jnp.moveaxis(x, -4, -3).reshape(*lead, (h // P) * (w // P), P * P * c)
        return x


@nnx.jit(static_argnums=(0, 1))
def _seg_head(classes=5, seed=0):
    # Built under jit: eager initialisation compiles every initialiser separately (slow on a shared CPU).
    head = SegHead(P * P * 3, classes, rngs=nnx.Rngs(seed))
    head.head.kernel[...] = jax.random.normal(jax.random.key(seed), head.head.kernel.shape)
    return head


# -- crops and alignment vs the official torch functions ------------------------------------------------------


def _torch_align(t, tgt, overlap, is_wide, second):
    import torch.nn.functional as F

    th, tw = tgt
    if not overlap:
        return F.interpolate(t, (th, tw), mode="bilinear")
    s = max(th, tw)
    up = F.interpolate(t, (s, s), mode="bilinear")
    if not second:
        return up[..., :th, :tw]
    return up[..., :th, s - tw:] if is_wide else up[..., s - th:, :tw]


@pytest.mark.parametrize("hw,label_hw", [((8, 12), (6, 9)), ((12, 8), (9, 7)), ((8, 16), (8, 16)), ((8, 8), (5, 5))])
def test_crops_and_alignment_match_official(hw, label_hw):
    import torch  # only here: the sharded-evaluation subprocess imports this file and need not load torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (2, 3, *hw, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, (2, 3, *label_hw))
    crops, split, overlap, is_wide = square_crops(frames, labels)
    s = min(hw)
    assert crops.shape == ((2 if hw == (s, s) else 4), 3, s, s, 3)
    if is_wide is None:
        assert crops is frames and split is labels
    else:
        b = 2
        np.testing.assert_array_equal(crops[:b], frames[..., :s, :s, :])
        np.testing.assert_array_equal(crops[b:], frames[..., hw[0] - s:, hw[1] - s:, :])
        axis = -1 if is_wide else -2
        mid = label_hw[axis] // 2
        np.testing.assert_array_equal(np.take(split[b:], range(split.shape[axis]), axis=axis),
                                      np.take(labels, range(mid, label_hw[axis]), axis=axis))
        if label_hw[axis] % 2:  # odd: the first half is padded with one ignored row/column
            assert (np.take(split[:b], [-1], axis=axis) == 255).all()
    assert overlap == (is_wide is not None and max(hw) / min(hw) < 2.0)
    # A crop's head output [B, g, g, C] aligned onto its label half, against the official torch code.
    logits = rng.normal(size=(crops.shape[0], 3, 3, 4)).astype(np.float32)
    target = split.shape[-2:]
    ours = np.asarray(ev.upsample_to_labels(jnp.asarray(logits), target, overlap, is_wide))
    t = torch.from_numpy(logits).permute(0, 3, 1, 2)
    half = t.shape[0] // 2
    if is_wide is None:
        ref = F.interpolate(t, target, mode="bilinear")
    else:
        ref = torch.cat([_torch_align(t[:half], target, overlap, is_wide, False),
                         _torch_align(t[half:], target, overlap, is_wide, True)])
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_float_labels_are_padded_with_zero():
    frames = np.zeros((1, 1, 4, 8, 3), np.uint8)
    _, labels, _, _ = square_crops(frames, np.ones((1, 1, 3, 5), np.float32))
    assert labels.shape == (2, 1, 3, 3) and (labels[0, 0, :, -1] == 0).all()


# -- protocol bookkeeping ---------------------------------------------------------------------------------------


def _static_batch(b=2, t=7, hw=(8, 8), seed=0):
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 255, (b, 1, *hw, 3), dtype=np.uint8)
    return {"frames": np.repeat(frame, t, axis=1), "timestamps": np.tile(np.arange(t, dtype=np.float32) * 0.2, (b, 1))}


def _oracle_labels(head, vfm, frames, label_hw):
    feats = vfm(frames[:, 0])
    out = on_patch_grid(head, feats, (frames.shape[2] // P, frames.shape[3] // P))
    up = ev.resize_bilinear(out if out.ndim == 4 else out[..., None], label_hw)
    labels = np.asarray(jnp.argmax(up, -1)) if isinstance(head, SegHead) else np.asarray(up[..., 0])
    return np.repeat(labels[:, None], frames.shape[1], axis=1)


def test_copy_last_on_static_video_is_perfect(tmp_path):
    vfm = PixelVFM()
    seg, depth = _seg_head(), nnx.jit(lambda: DepthHead(P * P * 3, rngs=nnx.Rngs(1)))()
    seg_batch, depth_batch = _static_batch(seed=1), _static_batch(seed=2)
    seg_batch["labels"] = _oracle_labels(seg, vfm, seg_batch["frames"], (12, 12))
    seg_batch["labels"][:, :, 0, :] = 255  # ignored pixels are never scored
    depth_batch["labels"] = _oracle_labels(depth, vfm, depth_batch["frames"], (10, 10))
    results = ev.evaluate([ev.CopyLast()], vfm, {"vspw": [seg_batch, seg_batch], "kitti": [depth_batch]},
                          {"vspw": seg, "kitti": depth})
    for ch, steps in [("c4_h1", ["t0"]), ("c4_h3", ["t0", "t1", "t2"])]:
        entry = results["vspw"]["copy_last"][ch]["mean"]
        assert sorted(k for k in entry if k != "loss") == steps
        for step in steps:
            assert entry[step]["miou"] == pytest.approx(100.0)
            assert entry[step]["loss"] == 0.0
            assert results["kitti"]["copy_last"][ch]["mean"][step]["rmse"] == pytest.approx(0.0, abs=1e-5)
    assert "best" not in results["vspw"]["copy_last"]["c4_h1"]
    json_path, md_path = ev.write_results(results, str(tmp_path))
    assert json.loads(open(json_path).read())["kitti"]["copy_last"]["c4_h3"]["mean"]["t2"]["rmse"] < 1e-5
    table = open(md_path).read()
    assert "| vspw | copy_last | mean | c4_h3 | t2 |" in table and "100" in table


class RecordingForecaster:
    """Predicts frame k as (features of frame k) + noise of sample s; records what it was given."""

    name, criterion = "fake", staticmethod(ev.world_criterion)

    def __init__(self, num_samples=3):
        self.num_samples, self.calls = num_samples, []

    def __call__(self, clip, *, ctx_len, horizon, rng):
        feats, times = forecasters._window(clip, ctx_len, horizon)
        self.calls.append((ctx_len, horizon, np.asarray(times[0])))
        targets = feats[:, ctx_len:]
        offsets = jnp.arange(self.num_samples, dtype=jnp.float32)[None, :, None, None, None] * 0.1
        return ev.Forecast(targets[:, None] + offsets, targets, feats[:, :ctx_len], ctx_len)


def test_context_window_scored_labels_and_selection():
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 255, (2, 7, 8, 8, 3), dtype=np.uint8)  # a moving (random) video
    labels = np.full((2, 7, 8, 8), 255)
    labels[:, 4] = rng.integers(0, 5, (2, 8, 8))  # only frame 4 labelled: it is t0 of c4_h3 and nothing else
    batch = {"frames": frames, "timestamps": np.tile(np.arange(7, dtype=np.float32) * 0.2, (2, 1)), "labels": labels}
    fake = RecordingForecaster()
    results = ev.evaluate([fake], PixelVFM(), {"vspw": [batch]}, {"vspw": _seg_head()})
    # Windows end the clip: c4_h1 sees frames 2..6, c4_h3 frames 0..6 (timestamps not re-based).
    assert [(c, h) for c, h, _ in fake.calls] == [(4, 1), (4, 3)]
    np.testing.assert_allclose(fake.calls[0][2], np.arange(2, 7) * 0.2, rtol=1e-6)
    np.testing.assert_allclose(fake.calls[1][2], np.arange(0, 7) * 0.2, rtol=1e-6)
    res = results["vspw"]["fake"]
    assert "miou" in res["c4_h3"]["best"]["t0"] and "miou" not in res["c4_h3"]["best"]["t2"]
    assert all("miou" not in v for k, v in res["c4_h1"]["best"].items() if k != "loss")
    # Best = sample 0 (exact truth); mean = truth + 0.1 everywhere.
    assert res["c4_h3"]["best"]["t2"]["loss"] == 0.0
    assert res["c4_h3"]["mean"]["t2"]["loss"] == pytest.approx(0.5 * 0.1 ** 2 / 0.1, rel=1e-4)
    assert res["c4_h3"]["best"]["loss"] == 0.0


def test_select_samples_best_uses_last_frame():
    targets = jnp.zeros((1, 2, 3, 4))
    # sample 0 is perfect on frame 0 but bad on the last frame; sample 1 the reverse.
    rollouts = jnp.stack([jnp.stack([jnp.zeros((3, 4)), jnp.ones((3, 4))]),
                          jnp.stack([jnp.ones((3, 4)), jnp.zeros((3, 4))])])[None]
    sel = ev.select_samples(ev.Forecast(rollouts, targets, targets[:, :1], 1), ev.world_criterion)
    assert int(sel["best"][1][0]) == 1
    np.testing.assert_allclose(sel["mean"][0], 0.5)


def test_best_and_mean_of_random_samples():
    """select_samples (objectives.best_of_samples): the best sample is the closest on the LAST frame only."""
    rng = np.random.default_rng(5)
    rollouts = rng.normal(size=(2, 4, 3, 5, 6)).astype(np.float32)
    targets = rng.normal(size=(2, 3, 5, 6)).astype(np.float32)
    rollouts[0, 2, -1] = targets[0, -1] + 0.01  # sample 2 is best for clip 0 (on the last frame only)
    rollouts[1, 1, :-1] = targets[1, :-1]  # sample 1 is perfect EXCEPT on the last frame: not chosen for that
    rollouts[1, 3, -1] = targets[1, -1]
    sel = ev.select_samples(ev.Forecast(jnp.asarray(rollouts), jnp.asarray(targets), None, 1), ev.world_criterion)
    best, index = sel["best"]
    np.testing.assert_array_equal(np.asarray(index), [2, 3])
    np.testing.assert_array_equal(np.asarray(best), rollouts[[0, 1], [2, 3]])
    np.testing.assert_allclose(np.asarray(sel["mean"][0]), rollouts.mean(1), rtol=1e-6)


def test_wide_static_video_copy_last_equals_truth():
    vfm, seg = PixelVFM(), _seg_head(seed=4)
    batch = _static_batch(hw=(8, 12), seed=5)
    batch["labels"] = np.random.default_rng(6).integers(0, 5, (2, 7, 6, 9))

    class Truth(RecordingForecaster):
        name = "truth"

        def __call__(self, clip, *, ctx_len, horizon, rng):
            feats, _ = forecasters._window(clip, ctx_len, horizon)
            return ev.Forecast(feats[:, None, ctx_len:], feats[:, ctx_len:], feats[:, :ctx_len], ctx_len)

    results = ev.evaluate([ev.CopyLast(), Truth()], vfm, {"cityscapes": [batch]}, {"cityscapes": seg})
    for ch in ("c4_h1", "c4_h3"):
        a, b = results["cityscapes"]["copy_last"][ch]["mean"], results["cityscapes"]["truth"][ch]["mean"]
        assert a == b and 0 <= a["t0"]["miou"] <= 100


def test_bad_inputs():
    with pytest.raises(ValueError, match="does not fit"):
        ev.CopyLast()(ev.ClipFeatures(jnp.zeros((1, 4, 2, 3)), jnp.zeros((1, 4)), (1, 2), jnp.zeros((1, 2, 3))),
                      ctx_len=4, horizon=1, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="multiple of the VFM patch"):
        ev.evaluate([ev.CopyLast()], PixelVFM(), {"x": [_static_batch(hw=(10, 10))]}, {})


def test_batches_split_by_the_data_pipeline_score_like_unsplit_ones():
    from deltaworld_jax.data.pipeline import split_into_square_crops as pipeline_split

    vfm, seg = PixelVFM(), _seg_head(seed=7)
    batch = {"frames": np.random.default_rng(8).integers(0, 255, (2, 5, 8, 12, 3), dtype=np.uint8),
             "timestamps": np.tile(np.arange(5, dtype=np.float32) * 0.2, (2, 1)),
             "labels": np.random.default_rng(9).integers(0, 5, (2, 5, 6, 9)).astype(np.uint8)}
    settings = ev.EvalSettings(ctx_lens=(4,), horizons=(1,))
    ours = ev.evaluate([ev.CopyLast()], vfm, {"vspw": [batch]}, {"vspw": seg}, settings)
    theirs = ev.evaluate([ev.CopyLast()], vfm, {"vspw": [pipeline_split(batch)]}, {"vspw": seg}, settings)
    assert ours == theirs


def test_results_sum_over_hosts_like_one_pass():
    """Two 'hosts' each scoring one batch, merged through the serialised-state gather, equal one host
    scoring both."""
    vfm, seg = PixelVFM(), _seg_head(seed=10)
    rng = np.random.default_rng(11)
    batches = []
    for _ in range(2):
        b = {"frames": rng.integers(0, 255, (2, 5, 8, 8, 3), dtype=np.uint8),
             "timestamps": np.tile(np.arange(5, dtype=np.float32) * 0.2, (2, 1)),
             "labels": rng.integers(0, 5, (2, 5, 8, 8))}
        b["labels"][0] = 255  # one clip without labels: a 'host' may see keys the other lacks
        batches.append(b)
    settings = ev.EvalSettings(horizons=(1,))
    hosts = [ev.Evaluator([ev.CopyLast()], vfm, {"vspw": seg}, settings) for _ in range(2)]
    for host, batch in zip(hosts, batches):
        host.update("vspw", batch, jax.random.key(0))
    one = ev.Evaluator([ev.CopyLast()], vfm, {"vspw": seg}, settings)
    for batch in batches:
        one.update("vspw", batch, jax.random.key(0))
    blobs = [ev._serialise(h.states()) for h in hosts]
    merged = hosts[0].results(gather=lambda _: blobs)
    assert merged == one.results()
    assert merged != hosts[0].results()


def test_eval_hook_on_synthetic_clips(tmp_path):
    """The trainer's hook end to end: DeltaTok reconstruction on the synthetic eval set, scalars + pictures."""
    import ml_collections

    from deltaworld_jax.data import default_data_config
    from deltaworld_jax.models.deltatok import DeltaTok, DeltaTokConfig
    from deltaworld_jax.models.dinov3 import PixelPatchVFM

    data = default_data_config()
    data.frame_size = 16
    data.synthetic.height = data.synthetic.width = 16
    data.eval.num_synthetic_clips = 2
    data.eval.batch_size = 2
    config = ml_collections.ConfigDict({"model": {"kind": "deltatok"}, "data": data, "eval": {
        "datasets": ("synthetic",), "horizons": (1,), "num_plots": 1, "results_dir": str(tmp_path)}})
    vfm = PixelPatchVFM(patch_size=4)
    tok = nnx.jit(lambda: DeltaTok(DeltaTokConfig(hidden_size=48, num_layers=1, num_heads=3, intermediate_size=32),
                                   rngs=nnx.Rngs(0)))()
    out = ev.eval_hook(config, tok, vfm, step=7)
    assert out["synthetic/deltatok/c1_h1/mean/t0_loss"] >= 0
    assert out["synthetic/deltatok/c1_h1/s0/feats_mean"].dtype == np.uint8
    assert (tmp_path / "eval_results_7.json").exists() and (tmp_path / "eval_results_7.md").exists()


SHARDED_EVAL = """
import json
import numpy as np, jax
import test_evaluation as t
from deltaworld_jax.evaluation import protocol as ev
assert jax.local_device_count() == 4
batch = t._static_batch(b=2, t=3, hw=(8, 12), seed=12)   # 2 wide clips -> 4 crops: one per device
batch["labels"] = np.random.default_rng(13).integers(0, 5, (2, 3, 6, 9))
out = ev.evaluate([ev.CopyLast()], t.PixelVFM(), {"vspw": [batch]}, {"vspw": t._seg_head(seed=14)},
                  ev.EvalSettings(ctx_lens=(2,), horizons=(1,)))
print(json.dumps(out))
"""


def test_evaluation_split_over_local_devices_matches_one_device():
    import subprocess
    import sys

    batch = _static_batch(b=2, t=3, hw=(8, 12), seed=12)
    batch["labels"] = np.random.default_rng(13).integers(0, 5, (2, 3, 6, 9))
    expected = ev.evaluate([ev.CopyLast()], PixelVFM(), {"vspw": [batch]}, {"vspw": _seg_head(seed=14)},
                           ev.EvalSettings(ctx_lens=(2,), horizons=(1,)))
    done = subprocess.run([sys.executable, "-c", SHARDED_EVAL], env=check_env(devices=4), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got.keys() == expected.keys()
    g, e = got["vspw"]["copy_last"]["c2_h1"]["mean"]["t0"], expected["vspw"]["copy_last"]["c2_h1"]["mean"]["t0"]
    assert g["miou"] == pytest.approx(e["miou"], abs=1e-9) and g["loss"] == pytest.approx(e["loss"], abs=1e-7)
