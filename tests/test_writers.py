"""The metric writers: TensorBoard event files that TensorBoard reads (scalars, images, texts), written
without importing TensorFlow (clu's writer imported it: ~6 s at every start), and the progress report."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import check_env

REPO = pathlib.Path(__file__).resolve().parents[1]

WRITE = r"""
import sys
import numpy as np
from deltaworld_jax.training import metrics
writer = metrics.create_writer(sys.argv[1])
writer.write_scalars(1, {"loss": 0.5, "lr": 1e-3})
writer.write_scalars(2, {"loss": 0.25})
writer.write_images(2, {"one": np.full((1, 8, 6, 3), 7, np.uint8),
                        "two": np.linspace(0, 1, 2 * 4 * 5 * 3, dtype=np.float32).reshape(2, 4, 5, 3)})
writer.write_texts(2, {"note": "hello"})
writer.close()
print("TENSORFLOW_IMPORTED", "tensorflow" in sys.modules)
"""


def read_events(logdir):
    from tensorboard.backend.event_processing import event_accumulator as ea

    accumulator = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.TENSORS: 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_reads_what_the_writer_wrote_and_tensorflow_is_never_imported(tmp_path):
    proc = subprocess.run([sys.executable, "-c", WRITE, str(tmp_path)], env=check_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TENSORFLOW_IMPORTED False" in proc.stdout
    events = read_events(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    assert events.Scalars("lr")[0].value == pytest.approx(1e-3)
    one = events.Images("one")
    assert [(e.step, e.width, e.height) for e in one] == [(2, 6, 8)]
    from PIL import Image
    import io

    assert np.all(np.asarray(Image.open(io.BytesIO(one[0].encoded_image_string))) == 7)
    # Several images of one name: <name>/image/<i>; floats in [0, 1] become 0..255.
    assert {"two/image/0", "two/image/1"} <= set(events.Tags()["images"])
    last = np.asarray(Image.open(io.BytesIO(events.Images("two/image/1")[0].encoded_image_string)))
    assert last.shape == (4, 5, 3) and last.max() == 255
    assert events.Tensors("note")[0].tensor_proto.string_val == [b"hello"]


def test_images_must_be_a_batch(tmp_path):
    from deltaworld_jax.training import metrics

    writer = metrics.TensorBoardWriter(str(tmp_path))
    with pytest.raises(ValueError, match=r"image 'flat': expected \[N, H, W, C\], got shape \(4, 5, 3\)"):
        writer.write_images(0, {"flat": np.zeros((4, 5, 3), np.uint8)})
    writer.close()


def test_progress_reports_steps_per_second_and_eta_from_the_second_call(monkeypatch):
    from deltaworld_jax.training import metrics

    class Recorder(metrics.NullWriter):
        def __init__(self):
            self.scalars = []

        def write_scalars(self, step, scalars):
            self.scalars.append((step, scalars))

    clock = iter([0.0, 10.0, 12.0, 13.0, 14.0, 80.0, 81.0, 83.0])
    monkeypatch.setattr(metrics.time, "monotonic", lambda: next(clock))
    writer = Recorder()
    progress = metrics.Progress(num_train_steps=11, writer=writer, every_steps=4)  # clock 0: start
    progress(1)  # 10 s: the first step (compiling) only starts the clock
    progress(2)  # not a reporting step
    progress(4)  # 13 s: 3 steps in 3 s
    progress(8)  # 14 s: 4 steps in 1 s
    progress(9)  # 80 s: not a multiple of 4, but a minute since the last report
    progress(10)  # neither
    progress(11)  # 83 s: the last step is always reported
    assert [(s, v["steps_per_sec"], v["uptime"]) for s, v in writer.scalars] == [
        (4, 1.0, 13.0), (8, 4.0, 14.0), (9, 1 / 66, 80.0), (11, 2 / 3, 83.0)]
    # A NullWriter (metrics off, or not process 0) gets no progress at all.
    assert metrics.create_progress(9, metrics.NullWriter(), 4)(5) is None
