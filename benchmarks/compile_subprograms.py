"""Compile PARTS of a stage's train step for a TPU topology (needs libtpu, no TPU) and print the CPU seconds
of each compile: where in the program the TPU compile time goes, part by part.

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 nice -n 15 python -m benchmarks.compile_subprograms \
        --parts=opt,vfm,loss,full --config=configs/kinetics.py:stage=deltatok_256 --per_chip_batch=8

Parts (each jitted with the trainer's shardings on the same mesh, the micro-batches in the same lax.scan):
  vfm   the frozen VFM's forward on the last two frames of every micro-batch (DeltaTok stages)
  loss  the task's loss, forward only, summed over the micro-batches
  grad  its gradient, summed over the micro-batches (no optimiser)
  opt   the optimiser update, gradient norms and non-finite check alone (the parameters as the gradient)
  full  the trainer's real step (train_step.make_train_step)
CPU seconds are the process's (all threads) during `compile()`; on a shared host they move far less with
the load than wall seconds. Only measures.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deltaworld_jax import aot, sharding as sharding_lib
from deltaworld_jax.training.recipe import load_config_file
from deltaworld_jax.training import optimizer as optimizer_lib, train_step as step_lib, trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="opt,vfm,loss,full")
    parser.add_argument("--config", default="configs/kinetics.py:stage=deltatok_256")
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--sharding", default="fsdp", choices=sorted(aot.SHARDINGS))
    parser.add_argument("--per_chip_batch", type=int, default=8)
    args = parser.parse_args()

    devices = aot.topology_devices(args.topology)
    accumulation = aot.EFFECTIVE_BATCH // (len(devices) * args.per_chip_batch)
    cfg = aot.benchmark_config(load_config_file(args.config), batch_size=aot.EFFECTIVE_BATCH,
                               accumulation_steps=accumulation, mesh_shape=aot.SHARDINGS[args.sharding])
    mesh = sharding_lib.make_mesh(cfg.mesh, devices=devices)
    setup = trainer.build(cfg, mesh, abstract_frozen=True)
    state, frozen, batch, key = aot.abstract_step_args(setup, cfg)
    task, graphdef, frozen_graphdef = setup.task, setup.graphdef, setup.frozen_graphdef

    def loss_fn(params, extra, frozen_state, micro, rng):
        trainable, frozen_module = nnx.merge(graphdef, params, extra), nnx.merge(frozen_graphdef, frozen_state)
        return task.loss(trainable, frozen_module, micro, rng)[0].astype(jnp.float32)

    def summed_over_microbatches(fn, batch, key, init):
        micro = step_lib._microbatches(batch, accumulation, mesh)

        def body(total, i):
            return jax.tree.map(jnp.add, total, fn(step_lib._microbatch(micro, batch, i), jax.random.fold_in(key, i))), None

        return jax.lax.scan(body, init, jnp.arange(accumulation))[0]

    def vfm(state, frozen_state, batch, key):
        module = nnx.merge(frozen_graphdef, frozen_state)
        return summed_over_microbatches(lambda m, r: jnp.sum(module(m["frames"][:, -2:]).astype(jnp.float32)),
                                        batch, key, jnp.float32(0))

    def loss(state, frozen_state, batch, key):
        return summed_over_microbatches(lambda m, r: loss_fn(state.params, state.extra, frozen_state, m, r),
                                        batch, key, jnp.float32(0))

    def grad(state, frozen_state, batch, key):
        g = jax.grad(loss_fn)
        return summed_over_microbatches(lambda m, r: g(state.params, state.extra, frozen_state, m, r), batch, key,
                                        jax.tree.map(jnp.zeros_like, state.params))

    def opt(state, frozen_state, batch, key):
        grads = state.params
        updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        norms = optimizer_lib.global_norm_by_module(grads)
        finite = jnp.isfinite(norms["total"]) & step_lib.all_finite(params)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        return state.replace(params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state)), norms

    def full(state, frozen_state, batch, key):
        return step_lib.make_train_step(task, graphdef, frozen_graphdef, setup.tx, accumulation_steps=accumulation,
                                        mesh=mesh, lr_schedule=setup.schedule)(state, frozen_state, batch, key)

    parts = {"vfm": vfm, "loss": loss, "grad": grad, "opt": opt, "full": full}
    for name in args.parts.split(","):
        if name not in parts:
            parser.error(f"unknown part {name!r}; known: {sorted(parts)}")
        jitted = jax.jit(parts[name], in_shardings=(setup.state_shardings, setup.frozen_shardings,
                                                    jax.tree.map(lambda x: x.sharding, batch),
                                                    sharding_lib.replicated(mesh)))
        with jax.set_mesh(mesh):
            lowered = jitted.lower(state, frozen, batch, key)
        wall, cpu = time.perf_counter(), time.process_time()
        compiled = lowered.compile()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(json.dumps({"part": name, "config": args.config, "topology": args.topology, "compile_s": round(wall, 1),
                          "compile_cpu_s": round(cpu, 1),
                          "temporaries_gib": round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 3)}),
              flush=True)


if __name__ == "__main__":
    main()
