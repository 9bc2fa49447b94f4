"""Evaluation metrics with sum-reducible states: mIoU (confusion matrix) and depth RMSE (sum of squared errors
and a pixel count).

Per batch, a jittable function computes the state from (possibly sharded) device arrays: summing over a
sharded batch inside jit reduces over devices, and the result is replicated, so every host sees the global
sum. The host then adds it into a numpy accumulator in int64 / float64 (an int32 confusion matrix would
overflow after ~2e9 pixels of one class). The final numbers therefore do not depend on how the data were
split into batches, devices or hosts.

Semantics match the official torchmetrics metrics:
  mIoU = MulticlassJaccardIndex(num_classes, ignore_index=255, average="macro"): pixels whose label is 255
    are dropped; per-class IoU = tp / (tp + fp + fn); the mean is over classes that occur in the target OR
    the prediction of the accumulated pixels (classes absent from both are excluded, torchmetrics >= 1.4).
    Logits are turned into labels by argmax over classes (first maximum wins, as torch.argmax).
    Labels outside [0, num_classes) other than 255 are also dropped (torchmetrics with validate_args=False,
    as the official code runs it, would instead fail).
  RMSE = MeanSquaredError(squared=False) on pixels with gt > 0: sqrt(sum of squared errors / count), pooled
    over all pixels of all images (not a mean of per-image RMSEs).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255


@partial(jax.jit, static_argnames=("num_classes", "ignore_index"))
def confusion_matrix(predictions, labels, num_classes: int, ignore_index: int = IGNORE_LABEL):
    """[num_classes, num_classes] int32 counts, rows = target class, columns = predicted class.

    predictions: logits [..., C] (argmax over the last axis) or integer class ids with the labels' shape.
    labels: integer [...], `ignore_index` (and anything outside [0, C)) not counted."""
    if predictions.ndim == labels.ndim + 1:
        if predictions.shape[-1] != num_classes:
            raise ValueError(f"logits have {predictions.shape[-1]} classes, expected {num_classes}")
        predictions = jnp.argmax(predictions, axis=-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} do not match")
    labels = labels.astype(jnp.int32)
    predictions = predictions.astype(jnp.int32)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    index = jnp.where(valid, labels * num_classes + predictions, 0).reshape(-1)
    counts = jnp.bincount(index, weights=valid.reshape(-1).astype(jnp.int32), length=num_classes * num_classes)
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


@jax.jit
def squared_error_sum(predicted_depth, gt_depth):
    """(sum of squared errors, number of pixels) over pixels with gt_depth > 0; shapes must match."""
    if predicted_depth.shape != gt_depth.shape:
        raise ValueError(f"predicted depth {predicted_depth.shape} and gt {gt_depth.shape} do not match")
    valid = gt_depth > 0
    diff = jnp.where(valid, predicted_depth.astype(jnp.float32) - gt_depth.astype(jnp.float32), 0.0)
    return jnp.sum(diff * diff), jnp.sum(valid.astype(jnp.int32))


def iou_from_confusion(confusion: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(mIoU, per-class IoU, per-class 'present' mask) from a confusion matrix, torchmetrics 'macro' rules."""
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    target, predicted = confusion.sum(1), confusion.sum(0)
    union = target + predicted - tp
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=union > 0)
    present = (target + predicted) > 0
    miou = float(iou[present].mean()) if present.any() else float("nan")
    return miou, iou, present


@dataclasses.dataclass
class MeanIoU:
    """Host-side mIoU accumulator; `update` takes logits/labels (device or host arrays) or a confusion
    matrix (`add_confusion`)."""

    num_classes: int
    ignore_index: int = IGNORE_LABEL
    confusion: np.ndarray = None

    def __post_init__(self):
        if self.confusion is None:
            self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, predictions, labels) -> "MeanIoU":
        return self.add_confusion(confusion_matrix(predictions, labels, self.num_classes, self.ignore_index))

    def add_confusion(self, confusion) -> "MeanIoU":
        self.confusion += np.asarray(jax.device_get(confusion), np.int64)
        return self

    def merge(self, other: "MeanIoU") -> "MeanIoU":
        return MeanIoU(self.num_classes, self.ignore_index, self.confusion + other.confusion)

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    def compute(self) -> float:
        return iou_from_confusion(self.confusion)[0]


@dataclasses.dataclass
class RootMeanSquaredError:
    """Host-side depth RMSE accumulator (pixels with gt > 0)."""

    sum_squared_error: float = 0.0
    count: int = 0

    def update(self, predicted_depth, gt_depth) -> "RootMeanSquaredError":
        return self.add(*squared_error_sum(predicted_depth, gt_depth))

    def add(self, sum_squared_error, count) -> "RootMeanSquaredError":
        self.sum_squared_error += float(jax.device_get(sum_squared_error))
        self.count += int(jax.device_get(count))
        return self

    def merge(self, other: "RootMeanSquaredError") -> "RootMeanSquaredError":
        return RootMeanSquaredError(self.sum_squared_error + other.sum_squared_error, self.count + other.count)

    def compute(self) -> float:
        return float(np.sqrt(self.sum_squared_error / self.count)) if self.count else float("nan")
