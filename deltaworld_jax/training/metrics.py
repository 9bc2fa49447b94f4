"""Training metrics: the writers (log + TensorBoard event files, on process 0 only), progress reporting, and
the buffer of per-step device metrics that is read back only on the logging cadence (no host sync per step).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from absl import logging


class NullWriter:
    """Drops everything: for runs that must not write metric files (`config.train.write_metrics=False`)."""

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


class LoggingWriter:
    """Every scalar and text in the log: `[step] name=value, ...` (images only by their shapes)."""

    def write_scalars(self, step, scalars):
        logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(scalars.items())))

    def write_images(self, step, images):
        logging.info("[%d] images: %s", step, {k: tuple(np.shape(v)) for k, v in images.items()})

    def write_texts(self, step, texts):
        logging.info("[%d] %s", step, ", ".join(f"{k}={v}" for k, v in sorted(texts.items())))

    def flush(self):
        """The log is not buffered here."""

    def close(self):
        """Nothing to release."""


class TensorBoardWriter:
    """TensorBoard event files: scalars, images (PNG) and texts, written with the tensorboard package's
    record framing and protos. No TensorFlow: clu's SummaryWriter imports it, about 6 s at every start on
    a CPU machine, for files this class writes in the same format."""

    def __init__(self, logdir: str):
        import socket

        from etils import epath
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        # The record framing only (length, CRCs): tensorboard's EventFileWriter would import TensorFlow for
        # its file I/O. epath opens local and gs:// paths alike.
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._pb = dict(event=event_pb2, summary=summary_pb2, tensor=tensor_pb2, shape=tensor_shape_pb2,
                        types=types_pb2)
        folder = epath.Path(logdir)
        folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self._file = (folder / f"events.out.tfevents.{int(now)}.{socket.gethostname()}").open("wb")
        self._records = RecordWriter(self._file)
        self._add(event_pb2.Event(wall_time=now, file_version="brain.Event:2"))

    def _add(self, event) -> None:
        self._records.write(event.SerializeToString())

    def _write(self, step: int, values: list) -> None:
        pb = self._pb
        self._add(pb["event"].Event(wall_time=time.time(), step=int(step), summary=pb["summary"].Summary(value=values)))

    def write_scalars(self, step, scalars):
        value = self._pb["summary"].Summary.Value
        self._write(step, [value(tag=k, simple_value=float(v)) for k, v in scalars.items()])

    def write_images(self, step, images):
        """images: {name: [N, H, W, C]} uint8, or floats in [0, 1]; several images of one name are tagged
        <name>/image/<i>, as TensorFlow's image summaries name them."""
        import io

        from PIL import Image

        summary = self._pb["summary"].Summary
        values = []
        for name, batch in images.items():
            batch = np.asarray(batch)
            if batch.ndim != 4:
                raise ValueError(f"image {name!r}: expected [N, H, W, C], got shape {batch.shape}")
            if batch.dtype != np.uint8:
                batch = np.round(np.clip(batch.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)
            for i, image in enumerate(batch):
                buffer = io.BytesIO()
                Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
                tag = name if len(batch) == 1 else f"{name}/image/{i}"
                values.append(summary.Value(tag=tag, image=summary.Image(
                    height=image.shape[0], width=image.shape[1], colorspace=image.shape[2],
                    encoded_image_string=buffer.getvalue())))
        self._write(step, values)

    def write_texts(self, step, texts):
        pb = self._pb
        metadata = pb["summary"].SummaryMetadata(
            plugin_data=pb["summary"].SummaryMetadata.PluginData(plugin_name="text"))
        self._write(step, [pb["summary"].Summary.Value(tag=k, metadata=metadata, tensor=pb["tensor"].TensorProto(
            dtype=pb["types"].DT_STRING, string_val=[str(v).encode()], tensor_shape=pb["shape"].TensorShapeProto()))
            for k, v in texts.items()])

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


class MultiWriter:
    """Writes to each of `writers`."""

    def __init__(self, writers):
        self.writers = list(writers)

    def write_scalars(self, step, scalars):
        for writer in self.writers:
            writer.write_scalars(step, scalars)

    def write_images(self, step, images):
        for writer in self.writers:
            writer.write_images(step, images)

    def write_texts(self, step, texts):
        for writer in self.writers:
            writer.write_texts(step, texts)

    def flush(self):
        for writer in self.writers:
            writer.flush()

    def close(self):
        for writer in self.writers:
            writer.close()


def create_writer(workdir: str, enabled: bool = True):
    """The log and TensorBoard event files in `workdir` on process 0; nothing elsewhere (their metrics are
    process 0's: every metric is a global value)."""
    if not enabled or jax.process_index() > 0:
        return NullWriter()
    return MultiWriter([LoggingWriter(), TensorBoardWriter(workdir)])


class Progress:
    """Every `every_steps` steps, at least every `every_secs` seconds, and at the last step: steps/s since
    the previous report, uptime and ETA, in the log and as the scalars `steps_per_sec` and `uptime`. The
    first call only starts the clock: the first step compiles."""

    def __init__(self, num_train_steps: int, writer, every_steps: int, every_secs: float = 60.0):
        self.num_train_steps, self.writer, self.every_steps = int(num_train_steps), writer, max(1, int(every_steps))
        self.every_secs = float(every_secs)
        self._start = time.monotonic()
        self._last: tuple[int, float] | None = None

    def __call__(self, step: int) -> None:
        now = time.monotonic()
        if self._last is None:
            self._last = (step, now)
            return
        last_step, last_time = self._last
        due = step % self.every_steps == 0 or step == self.num_train_steps or now - last_time >= self.every_secs
        if not due or step <= last_step or now <= last_time:
            return
        rate = (step - last_step) / (now - last_time)
        self._last = (step, now)
        eta_minutes = (self.num_train_steps - step) / rate / 60
        logging.info("%.1f steps/s, %.1f%% (%d/%d), ETA: %.0fm", rate, 100 * step / max(1, self.num_train_steps),
                     step, self.num_train_steps, eta_minutes)
        self.writer.write_scalars(step, {"steps_per_sec": rate, "uptime": now - self._start})


def create_progress(num_train_steps: int, writer, every_steps: int):
    """steps/s, uptime and ETA (Progress), written through `writer`; nothing for a NullWriter."""
    if isinstance(writer, NullWriter):
        return lambda step: None
    return Progress(num_train_steps, writer, every_steps)


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
