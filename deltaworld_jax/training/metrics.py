"""Training metrics: clu metric writers (TensorBoard + logs on process 0 only), progress reporting, and the
buffer of per-step device metrics that is read back only on the logging cadence (no host sync per step).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


class NullWriter:
    """Drops everything: for runs that must not write metric files (`config.train.write_metrics=False`,
    used by multi-process tests so that they need not import TensorFlow, which clu's writers load)."""

    def write_scalars(self, step, scalars):
        del step, scalars

    def write_images(self, step, images):
        del step, images

    def write_texts(self, step, texts):
        del step, texts

    def flush(self):
        """Nothing is buffered."""

    def close(self):
        """Nothing to release."""


def create_writer(workdir: str, enabled: bool = True):
    """clu's default writer: TensorBoard + logs on process 0, logs only elsewhere (clu then drops them)."""
    if not enabled:
        return NullWriter()
    from clu import metric_writers  # imports TensorFlow: only when metrics are written

    return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)


def create_progress(num_train_steps: int, writer, every_steps: int):
    """steps/s, uptime and ETA (clu's ReportProgress), written through `writer`."""
    if isinstance(writer, NullWriter):
        return lambda step: None
    from clu import periodic_actions

    return periodic_actions.ReportProgress(num_train_steps=num_train_steps, writer=writer, every_steps=every_steps)


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss. The last checkpoint before `step` is intact."""

    def __init__(self, step: int, value: float):
        self.step = step
        self.value = value
        super().__init__(f"Non-finite loss {value} at step {step}: training stopped; no checkpoint was "
                         f"written at or after this step, the last good one is kept.")


class MetricBuffer:
    """Collects each step's metric dict (device arrays, not yet read back) until the next flush."""

    def __init__(self):
        self._steps: list[int] = []
        self._metrics: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, step: int, metrics: dict[str, Any]) -> None:
        self._steps.append(step)
        self._metrics.append(metrics)

    def flush(self) -> tuple[list[int], dict[str, np.ndarray]]:
        """Read everything back (one transfer) -> (steps, {name: values per step}); raises
        NonFiniteLossError naming the FIRST step whose loss is not finite."""
        if not self._steps:
            return [], {}
        host = jax.device_get(self._metrics)
        steps = self._steps
        self._steps, self._metrics = [], []
        stacked = {k: np.asarray([float(m[k]) for m in host]) for k in host[0]}
        for step, loss in zip(steps, stacked["loss"]):
            if not math.isfinite(loss):
                raise NonFiniteLossError(step, float(loss))
        return steps, stacked
