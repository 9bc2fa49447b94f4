"""A real 2-process run on localhost (jax.distributed + gloo CPU collectives, 2 fake devices per process,
FSDP over all 4) trains and saves; a 1-process, 1-device run restores that checkpoint onto its own mesh and
continues training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from deltaworld_jax.training import checkpointing, trainer
from test_trainer import HERE, ROOT, toy_config, toy_data

WORKER = r"""
import json, sys
import test_trainer as T
from deltaworld_jax.training import trainer
workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
config = T.toy_config(**overrides)
out = trainer.run(config, workdir, data_fn=T.toy_data)
import jax
print("RESULT" + json.dumps({"process": jax.process_index(), "count": jax.process_count(),
                             "devices": jax.device_count(), "step": out["step"],
                             "losses": {str(k): v for k, v in out["losses"].items()}}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training_then_single_process_restore(tmp_path):
    port = _free_port()
    overrides = {"train.num_steps": 3, "checkpoint.every_steps": 3, "train.write_metrics": False,
                 "mesh.shape": {"data": 1, "fsdp": -1, "tensor": 1},
                 "distributed.coordinator_address": f"127.0.0.1:{port}", "distributed.num_processes": 2}
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, HERE]),
                   XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PROCESS_ID=str(pid),
                   DELTAWORLD_TEST_NO_JIT_CACHE="1")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), json.dumps(overrides)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, f"worker failed:\n{out[-2000:]}\n{err[-5000:]}"
        results.append(json.loads([l for l in out.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):]))
    assert sorted(r["process"] for r in results) == [0, 1]
    assert all(r["count"] == 2 and r["devices"] == 4 and r["step"] == 3 for r in results)
    # both processes saw the same global loss (one program over all 4 devices)
    assert results[0]["losses"] == results[1]["losses"]
    assert checkpointing.checkpoint_steps(str(tmp_path / "checkpoints")) == [3]
    # each process saved its own data iterator state
    saved = sorted(n for n in os.listdir(tmp_path / "checkpoints" / "3" / "data_iter") if n.startswith("process"))
    assert saved == ["process_0-of-2.json", "process_1-of-2.json"]

    # One process, one device, data-parallel mesh: restore the 4-device FSDP checkpoint and continue.
    single = trainer.run(toy_config(**{"train.num_steps": 5, "checkpoint.every_steps": 5}), str(tmp_path),
                         data_fn=toy_data)
    assert single["step"] == 5 and sorted(single["losses"]) == [4, 5]
    assert all(v == v for v in single["losses"].values())
    print("2-process losses", results[0]["losses"], "-> 1-process continued", single["losses"])
