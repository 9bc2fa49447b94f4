"""Ahead-of-time compilation of the real train step for a TPU slice (v5e:2x2) on this CPU host, through the
`benchmark aot` command itself. Needs libtpu (compile-only TPU devices); skipped where it is missing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed in this Python: TPU ahead-of-time compilation needs it "
           "(pip install libtpu==0.0.42.1; no TPU is needed)")

TINY_CONFIG = textwrap.dedent('''
    import ml_collections
    from configs import common

    def get_config(arg=""):
        c = common.base_config()
        c.model.kind = "deltatok"
        c.model.dtype = "bfloat16"
        c.model.num_layers = 1
        c.model.intermediate_size = 256
        c.vfm = ml_collections.ConfigDict(dict(kind="pixel", patch_size=8, num_heads=3, weights=""))
        c.data = ml_collections.ConfigDict(dict(num_frames=2, frame_size=32))
        c.train.batch_size = 8
        c.optim.grad_clip_norm = 0.01
        return c
''')


def test_aot_compiles_real_step_for_v5e_slice_with_rule_shardings(tmp_path):
    config_path = tmp_path / "tiny_deltatok.py"
    config_path.write_text(TINY_CONFIG)
    out = tmp_path / "aot.json"
    # ALLOW_MULTIPLE_LIBTPU_LOAD: compile-only use of libtpu never touches a TPU, so other processes
    # holding libtpu's lock file (another compile) must not stop this one.
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.benchmark", "aot", f"--config={config_path}", "--topology=v5e:2x2",
         "--sharding=fsdp_tp2", "--per_chip_batch=1", f"--json_out={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "memory per device" in proc.stdout and "HBM" in proc.stdout
    r = json.loads(out.read_text())
    assert r["chips"] == 4 and r["accelerator_type"] == "v5litepod-4"
    assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    # per-chip batch 1 x 4 chips x accumulation 256 = the recipe's effective batch.
    assert r["per_chip_batch"] == 1 and r["accumulation_steps"] == 256 and r["effective_batch"] == 1024
    m = r["memory"]
    assert m["arguments"] > 0 and m["temporaries"] > 0 and m["generated_code"] > 0
    assert 0 < m["total"] < m["hbm"] == 16 * 2**30
    assert r["xla_flops_per_device"] > 0 and r["matmul_flops_per_step"] > 0
    assert r["roofline_step_seconds"] > 0
    # The compiled program keeps the train state where the logical rules put it: embed -> fsdp,
    # mlp/heads -> tensor, norms and per-head gate outputs replicated.
    assert r["state_shardings_kept"] is True
    specs = r["state_specs"]
    assert specs["encoder_blocks/0/mlp/up_proj/kernel"] == ["fsdp", "tensor"]
    assert specs["encoder_blocks/0/mlp/down_proj/kernel"] == ["tensor", "fsdp"]
    assert specs["encoder_blocks/0/attention/q_proj/kernel"] == ["fsdp", "tensor"]
    assert specs["encoder_blocks/0/attention/attn_gate/kernel"] == ["fsdp", None]
    assert specs["encoder_blocks/0/norm1/weight"] == [None]


MICROBATCH_PROGRAM = textwrap.dedent('''
    import jax, jax.numpy as jnp, ml_collections
    from jax.sharding import NamedSharding, PartitionSpec as P
    from deltaworld_jax import aot, sharding as sharding_lib
    from deltaworld_jax.training import train_step

    mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(shape=dict(data=1, fsdp=4, tensor=1))),
                                  devices=aot.topology_devices("v5e:2x2"))
    B, A, T, H, W = 16, 2, 8, 512, 512  # the 512px stages' uint8 clips, 4 per chip in 2 micro-batches
    shard = NamedSharding(mesh, P(sharding_lib.BATCH_AXES))
    batch = {"frames": jax.ShapeDtypeStruct((B, T, H, W, 3), jnp.uint8, sharding=shard),
             "times": jax.ShapeDtypeStruct((B, T), jnp.float32, sharding=shard)}

    def summed(batch):
        micro = train_step._microbatches(batch, A, mesh)

        def body(total, i):
            one = train_step._microbatch(micro, batch, i)
            return total + jnp.sum(one["frames"].astype(jnp.float32)) + jnp.sum(one["times"]), None
        return jax.lax.scan(body, jnp.float32(0), jnp.arange(A))[0]

    with jax.set_mesh(mesh):
        memory = jax.jit(summed).lower(batch).compile().memory_analysis()
    print("RESULT", memory.temp_size_in_bytes, B * T * H * W * 3 // 4)
''')


def test_micro_batches_of_uint8_frames_are_not_a_copy_of_the_batch_on_tpu():
    """The gradient-accumulation split of the batch must not relayout the chip's frames on TPU. With 2
    examples per device in each micro-batch, the split keeps the trailing dims: a bitcast. Flattening them
    (as before, at every size) made XLA copy the uint8 [.., 512, 512, 3] frames into a padded layout: 1.07 GB
    of temporaries for 25 MB of frames here, and 5.6 GiB of DeltaWorld 512px's 11.6 GiB per chip
    (benchmarks/RESULTS.md)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", MICROBATCH_PROGRAM], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    temporaries, frames_per_device = map(int, proc.stdout.split("RESULT", 1)[1].split())
    # Measured: 161 kB now, 1.07 GB before, for 25 MB of frames per chip. No buffer may approach the chip's
    # frames (the reductions stream over the micro-batch).
    assert temporaries < frames_per_device / 4, (temporaries, frames_per_device)
