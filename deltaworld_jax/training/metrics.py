"""Training metrics: clu metric writers (TensorBoard + logs on process 0 only), progress reporting, and the
buffer of per-step device metrics that is read back only on the logging cadence (no host sync per step).
"""

from __future__ import annotations

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


class Profiler:
    """A profiler trace of `num_steps` training steps (clu's periodic_actions.Profile), starting once the run's
    first `after_steps` steps after `first_step` (where it (re)started) are done, at least the first (which
    compiles), so compilation and warm-up stay out of it. The trace goes to `<logdir>/plugins/profile/<run>/`
    (TensorBoard's profile tab, or XProf / Perfetto). Call it after every step with the step just done;
    `close()` ends a trace the run stopped in the middle of."""

    def __init__(self, logdir: str, num_steps: int, first_step: int, after_steps: int = 5):
        from clu import periodic_actions

        if num_steps < 1 or after_steps < 0:
            raise ValueError(f"a profile needs num_steps >= 1 and after_steps >= 0, got {num_steps}, {after_steps}")
        # Steps only (no minimum duration, no time trigger): one trace per run.
        self._profile = periodic_actions.Profile(logdir=logdir, num_profile_steps=num_steps, profile_duration_ms=None,
                                                 first_profile=first_step + max(1, after_steps), every_secs=None)

    def __call__(self, step: int) -> None:
        self._profile(step)

    def close(self) -> None:
        try:
            jax.profiler.stop_trace()  # the trace still open when training ended first
        except RuntimeError:  # none running: the trace ended on its own (or never started)
            pass


def create_profiler(config, workdir: str, first_step: int):
    """`config.train.profile_steps` > 0: a Profiler writing under `workdir`; else None (the default)."""
    num_steps = int(config.train.get("profile_steps", 0))
    if num_steps == 0:
        return None
    return Profiler(workdir, num_steps, first_step, int(config.train.get("profile_after_steps", 5)))


class NonFiniteLossError(FloatingPointError):
    """Training kept producing non-finite losses or gradients: `consecutive` updates in a row up to `step` were
    skipped (the train step never applies them), and no state they touched was saved; the last good
    checkpoint is kept."""

    def __init__(self, step: int, value: float, consecutive: int = 1):
        self.step = step
        self.value = value
        self.consecutive = consecutive
        super().__init__(f"Non-finite loss {value} at step {step} ({consecutive} non-finite update(s) in a row, "
                         f"the limit is config.optim.max_consecutive_nonfinite): training stopped; those updates "
                         f"were skipped and nothing they produced was saved, the last good checkpoint is kept.")


class NonFiniteCounter:
    """Counts the train step's skipped (non-finite) updates from its `nonfinite` metric; raises
    NonFiniteLossError once `limit` of them come in a row."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.total = 0
        self.consecutive = 0

    def update(self, steps: list[int], values: dict[str, np.ndarray]) -> None:
        flags = values.get("nonfinite", np.zeros(len(steps)))
        for step, flag, loss in zip(steps, flags, values.get("loss", np.zeros(len(steps)))):
            if flag > 0:
                self.total += 1
                self.consecutive += 1
                if self.consecutive >= self.limit:
                    raise NonFiniteLossError(step, float(loss), self.consecutive)
            else:
                self.consecutive = 0


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
        """Read everything back (one transfer) -> (steps, {name: values per step}). Non-finite losses are
        returned as they are: the step skipped those updates (`nonfinite`), NonFiniteCounter judges them."""
        if not self._steps:
            return [], {}
        host = jax.device_get(self._metrics)
        steps = self._steps
        self._steps, self._metrics = [], []
        stacked = {k: np.asarray([float(m[k]) for m in host]) for k in host[0]}
        return steps, stacked
