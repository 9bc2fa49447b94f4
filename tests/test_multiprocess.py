"""Real 2-process runs on localhost (jax.distributed + gloo CPU collectives, 2 fake devices per process,
FSDP over all 4): they train and save; SIGTERM to one process or to all stops both at the same step with one
complete checkpoint, and the resumed runs repeat the uninterrupted run's losses exactly; a 1-process,
1-device run restores the 2-process checkpoint onto its own mesh and continues at the same global batch.
All share the same few 2-process runs (each costs two interpreters and a compile)."""

from __future__ import annotations

import json
import signal
import os
import socket
import subprocess
import sys

from deltaworld_jax.training import checkpointing, trainer
import grain
import numpy as np

from conftest import check_env
from test_trainer import ROOT, toy_config, toy_data

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A 2-process training run that marks each batch it consumes (<marks>/p<process>_<n>) so the parent can time
# its signals; prints RESULT {...} at the end.
SIGNAL_WORKER = r"""
import json, os, sys
import test_trainer as T
from deltaworld_jax.training import trainer
import jax
workdir, marks, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
config = T.toy_config(**overrides)

os.makedirs(marks, exist_ok=True)
mark = lambda n: os.path.join(marks, f"p{jax.process_index()}_{n}")
out = trainer.run(config, workdir, data_fn=lambda config, **kw: T.MarkingIterator(T.toy_data(config, **kw), mark))
print("RESULT" + json.dumps({"process": jax.process_index(), "step": out["step"], "stopped_by": out["stopped_by"],
                             "losses": {str(k): v for k, v in out["losses"].items()}}))
"""


def _two_processes(workdir, marks, overrides, *, sigterm_to=(), after_batch=0):
    """Run SIGNAL_WORKER on 2 localhost processes; SIGTERM `sigterm_to` (process ids) once process 0 has
    consumed `after_batch` batches. Returns both RESULT dicts (each process must exit 0)."""
    import time

    port = _free_port()
    overrides = {**overrides, "distributed.coordinator_address": f"127.0.0.1:{port}", "distributed.num_processes": 2}
    procs = []
    for pid in range(2):
        # The workers compile into config.train.compilation_cache (checked below), not the tests' cache.
        env = {**check_env(devices=2, cache=False), "JAX_PROCESS_ID": str(pid), "DELTAWORLD_TEST_NO_JIT_CACHE": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", SIGNAL_WORKER, str(workdir), str(marks),
                                       json.dumps(overrides)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=ROOT))
    if sigterm_to:
        deadline = time.time() + 400
        while not os.path.exists(os.path.join(marks, f"p0_{after_batch}")):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "run ended before the signal"
            time.sleep(0.005)
        for pid in sigterm_to:
            procs[pid].send_signal(signal.SIGTERM)
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{out[-2000:]}\n{err[-5000:]}"
        results.append(json.loads([l for l in out.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):]))
    return results


def test_two_processes_preempted_resumed_and_continued_in_one_process(tmp_path):
    """1) 2 processes, uninterrupted: both see the same losses, each saves its data iterator state.
    2) SIGTERM to process 1 only: both stop at the SAME step, write one complete checkpoint, exit 0. The
    resumed run gets SIGTERM on both processes: the same. A third run finishes. Every loss of the three runs
    equals the uninterrupted run's, step by step (exactly).
    3) One process, one device: restores the 4-device FSDP checkpoint of (1) and continues at global batch
    `step` (not batch 0: nothing replayed), with the skip counts of both processes."""
    num_steps = 16
    overrides = {"train.num_steps": num_steps, "checkpoint.every_steps": 1000, "train.write_metrics": False,
                 "train.log_every_steps": 1000, "mesh.shape": {"data": 1, "fsdp": -1, "tensor": 1},
                 "train.compilation_cache": str(tmp_path / "jax_cache")}
    reference = _two_processes(tmp_path / "reference", tmp_path / "marks_ref", overrides)
    assert reference[0]["losses"] == reference[1]["losses"] and len(reference[0]["losses"]) == num_steps
    expected = reference[0]["losses"]
    # config.train.compilation_cache: the processes wrote the compiled step there (later runs load it)
    assert any(n.startswith("jit_step") for n in os.listdir(tmp_path / "jax_cache")), os.listdir(tmp_path / "jax_cache")
    assert checkpointing.checkpoint_steps(str(tmp_path / "reference" / "checkpoints")) == [num_steps]
    saved = sorted(n for n in os.listdir(tmp_path / "reference" / "checkpoints" / str(num_steps) / "data_iter")
                   if n.startswith("process"))
    assert saved == ["process_0-of-2.json", "process_1-of-2.json"]  # each process saved its own

    workdir = tmp_path / "preempted"
    seen, stops = {}, []
    for run, targets in enumerate([(1,), (0, 1)]):  # the second run resumes the first one's checkpoint
        results = _two_processes(workdir, tmp_path / f"marks_{run}", overrides, sigterm_to=targets, after_batch=3)
        assert results[0]["step"] == results[1]["step"], results  # the same step on both processes
        assert results[0]["losses"] == results[1]["losses"]
        step = results[0]["step"]
        assert all(r["stopped_by"] == "preempted" for r in results) and step < num_steps, results
        assert max(checkpointing.checkpoint_steps(str(workdir / "checkpoints"))) == step  # one complete save
        stops.append(step)
        assert sorted(map(int, results[0]["losses"])) == list(range(len(seen) + 1, step + 1))  # resumed there
        seen.update(results[0]["losses"])
    assert seen == {s: expected[s] for s in seen}, {s: (seen[s], expected[s]) for s in seen}
    print(f"SIGTERM to process 1 -> both stopped at step {stops[0]}; then to both -> step {stops[1]}; "
          f"the {len(seen)} losses equal the uninterrupted run's")

    # 3) One process, one device, data-parallel mesh: continue the 2-process run for 2 steps. It reads global
    # batches `num_steps` and `num_steps + 1` (compared with a fresh 1-process iterator advanced that far), with
    # the skip counts of both processes; its losses agree with an uninterrupted 1-process run up to the float
    # drift of 4-device FSDP vs 1 device (measured 5e-4 relative after 20 steps; 5e-3 allowed).
    consumed = []

    def recording(config, **kw):
        return Recording(toy_data(config, **kw), consumed)

    longer = {"train.num_steps": num_steps + 2, "checkpoint.every_steps": 1000}
    single = trainer.run(toy_config(**longer), str(tmp_path / "reference"), data_fn=recording)
    fresh = toy_data(toy_config(**longer), process_index=0, process_count=1)
    global_batches = [next(fresh)["frames"] for _ in range(num_steps + 2)]
    assert len(consumed) == 2
    for got, want in zip(consumed, global_batches[num_steps:]):
        np.testing.assert_array_equal(got, want)
    alone = trainer.run(toy_config(**longer), str(tmp_path / "alone"), data_fn=toy_data)
    assert single["step"] == num_steps + 2 and sorted(single["losses"]) == [num_steps + 1, num_steps + 2]
    for s in (num_steps + 1, num_steps + 2):
        np.testing.assert_allclose(single["losses"][s], alone["losses"][s], rtol=5e-3)
    too_short = (num_steps + 2) * 8 // 4  # toy_data: every 4th example
    assert single["counters"]["data/skipped_too_short"] == alone["counters"]["data/skipped_too_short"] == too_short
    print("2-process run continued in 1 process:", single["losses"], "uninterrupted 1-process:",
          {s: alone["losses"][s] for s in single["losses"]})


class Recording(grain.DatasetIterator):
    """Wraps a TrainIterator; keeps the frames of every batch it hands out."""

    def __init__(self, parent, consumed):
        super().__init__(parent)
        self._consumed = consumed

    errors = property(lambda self: self._parent.errors)
    topology_independent = property(lambda self: self._parent.topology_independent)

    def global_state(self, step, errors=None):
        return self._parent.global_state(step, errors)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)

    def __next__(self):
        batch = next(self._parent)
        self._consumed.append(np.asarray(batch["frames"]))
        return batch
