"""mIoU / RMSE accumulators: hand-computed cases, torchmetrics semantics, and batch/device invariance."""

import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import check_env
from deltaworld_jax.evaluation import metrics as me


def test_miou_hand_computed():
    # 3 classes; class 2 never occurs in target or prediction -> excluded from the mean.
    labels = np.array([[0, 0, 1, 1, 255, 255]])
    preds = np.array([[0, 1, 1, 1, 0, 1]])  # the two 255 pixels are ignored whatever is predicted
    m = me.MeanIoU(3).update(jnp.asarray(preds), jnp.asarray(labels))
    np.testing.assert_array_equal(m.confusion, [[1, 1, 0], [0, 2, 0], [0, 0, 0]])
    # class 0: tp 1, union 2 -> 0.5; class 1: tp 2, union 3 -> 2/3
    assert m.compute() == pytest.approx((0.5 + 2 / 3) / 2)
    assert m.count == 4


def test_miou_counts_class_present_only_in_prediction():
    labels = np.array([0, 0, 0, 0])
    preds = np.array([0, 0, 0, 2])  # class 2 predicted but absent from target: IoU 0, still averaged
    assert me.MeanIoU(3).update(jnp.asarray(preds), jnp.asarray(labels)).compute() == pytest.approx((0.75 + 0) / 2)


def test_miou_from_logits_uses_argmax_over_last_axis():
    labels = np.array([[1, 0]])
    logits = np.array([[[0.1, 0.9], [0.7, 0.3]]], np.float32)  # argmax -> [1, 0]
    assert me.MeanIoU(2).update(jnp.asarray(logits), jnp.asarray(labels)).compute() == 1.0
    with pytest.raises(ValueError, match="classes"):
        me.MeanIoU(3).update(jnp.asarray(logits), jnp.asarray(labels))


def test_miou_all_ignored_is_nan_and_merge_adds():
    labels = np.full((2, 3), 255)
    m = me.MeanIoU(4).update(jnp.zeros((2, 3), jnp.int32), jnp.asarray(labels))
    assert np.isnan(m.compute()) and m.count == 0
    a = me.MeanIoU(2).update(jnp.asarray([0, 1]), jnp.asarray([0, 0]))
    b = me.MeanIoU(2).update(jnp.asarray([1, 1]), jnp.asarray([1, 1]))
    both = a.merge(b)
    np.testing.assert_array_equal(both.confusion, [[1, 1], [0, 2]])


def test_rmse_hand_computed_and_pooled():
    gt = np.array([[0.0, 2.0, 4.0], [1.0, 0.0, 0.0]], np.float32)
    pred = np.array([[9.0, 1.0, 6.0], [1.0, 5.0, 5.0]], np.float32)  # gt == 0 pixels are not scored
    r = me.RootMeanSquaredError().update(jnp.asarray(pred), jnp.asarray(gt))
    assert r.count == 3 and r.sum_squared_error == pytest.approx(1 + 4 + 0)
    assert r.compute() == pytest.approx(np.sqrt(5 / 3))
    # Pooling over images, not averaging per-image RMSEs: add a second image of one pixel with error 3.
    r.update(jnp.asarray([[3.0]]), jnp.asarray([[6.0]]))
    assert r.compute() == pytest.approx(np.sqrt(14 / 4))
    assert np.isnan(me.RootMeanSquaredError().compute())


def _numpy_reference(preds, labels, depth_pred, depth_gt, num_classes):
    valid = labels != 255
    conf = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(conf, (labels[valid], preds[valid]), 1)
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    present = (conf.sum(0) + conf.sum(1)) > 0
    miou = (tp[present] / union[present]).mean()
    dv = depth_gt > 0
    rmse = np.sqrt(np.mean((depth_pred[dv] - depth_gt[dv]).astype(np.float64) ** 2))
    return miou, rmse


SHARDED_SCRIPT = textwrap.dedent("""
    import os
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from deltaworld_jax.evaluation import metrics as me
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    C = 7
    logits = rng.normal(size=(24, 6, 5, C)).astype(np.float32)
    labels = rng.integers(0, C, size=(24, 6, 5)); labels[labels == 3] = 255   # class 3 only ignored
    labels[rng.random(labels.shape) < 0.2] = 255
    logits[..., 3] -= 100                                                         # ... and never predicted
    dpred = rng.uniform(0, 80, size=(24, 6, 5)).astype(np.float32)
    dgt = np.where(rng.random((24, 6, 5)) < 0.5, 0.0, rng.uniform(1, 80, size=(24, 6, 5))).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
    miou, rmse = me.MeanIoU(C), me.RootMeanSquaredError()
    for start in range(0, 24, 8):   # three batches of 8, each split over 8 devices
        sl = slice(start, start + 8)
        miou.update(shard(logits[sl]), shard(labels[sl]))
        rmse.update(shard(dpred[sl]), shard(dgt[sl]))
    once = me.MeanIoU(C).update(logits, labels).compute(), me.RootMeanSquaredError().update(dpred, dgt).compute()
    np.savez(os.environ["OUT"], miou=miou.compute(), rmse=rmse.compute(), miou1=once[0], rmse1=once[1],
             logits=logits, labels=labels, dpred=dpred, dgt=dgt)
""")


def test_sharded_multi_batch_accumulation_equals_single_pass(tmp_path):
    out = tmp_path / "out.npz"
    env = {**check_env(devices=8), "OUT": str(out)}
    subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, check=True, timeout=120)
    r = np.load(out)
    miou_ref, rmse_ref = _numpy_reference(r["logits"].argmax(-1), r["labels"], r["dpred"], r["dgt"], 7)
    assert float(r["miou"]) == pytest.approx(miou_ref, abs=1e-12)
    assert float(r["miou1"]) == pytest.approx(miou_ref, abs=1e-12)
    assert float(r["rmse"]) == pytest.approx(rmse_ref, rel=1e-6)
    assert float(r["rmse1"]) == pytest.approx(rmse_ref, rel=1e-6)
