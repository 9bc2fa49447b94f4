"""Size of the lowered train step (StableHLO ops, while loops) and the number of parameter leaves, per depth:
where the program's size (and so its compile time) comes from. Lowering only; nothing is compiled.

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 nice -n 15 python -m benchmarks.hlo_ops \
        --config=configs/kinetics.py:stage=deltatok_256 --depths=1,12

With the blocks stored stacked and scanned (models/block_stack.run_blocks) the model's own ops do not grow with depth,
so (ops at depth L - ops at depth 1) / (leaves at L - leaves at 1) is the work per parameter leaf: the
optimiser, clipping, gradient norms and metrics run once per leaf. Topology v5e:2x2 (needs libtpu) or
--topology= for the local devices.
"""

from __future__ import annotations

import argparse
import collections
import json
import re

import jax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/kinetics.py:stage=deltatok_256")
    parser.add_argument("--depths", default="1,12", help="config.model.num_layers values")
    parser.add_argument("--topology", default="v5e:2x2", help="a TPU topology (compile-only devices), or ''")
    parser.add_argument("--per_chip_batch", type=int, default=8)
    args = parser.parse_args()

    from deltaworld_jax import sharding as sharding_lib
    from deltaworld_jax import aot
    program = aot  # the trainer's real step as a program (was bench/program.py)

    from deltaworld_jax.training.recipe import load_config_file

    rows = []
    for depth in [int(d) for d in args.depths.split(",") if d]:
        config = load_config_file(args.config)
        config.model.num_layers = depth
        if args.topology:
            devices = aot.topology_devices(args.topology)
            chips = len(devices)
            accumulation = program.EFFECTIVE_BATCH // (chips * args.per_chip_batch)
            cfg = program.benchmark_config(config, batch_size=program.EFFECTIVE_BATCH,
                                           accumulation_steps=accumulation, mesh_shape=aot.SHARDINGS["fsdp"])
            mesh = sharding_lib.make_mesh(cfg.mesh, devices=devices)
        else:
            cfg = program.benchmark_config(config)
            mesh = sharding_lib.make_mesh(cfg.mesh)
        lowered, _, _, setup = program.lower_train_step(cfg, mesh)
        text = lowered.as_text()
        ops = collections.Counter(re.findall(r"= \"?([a-z_]+\.[a-z_]+)", text))
        row = {"num_layers": depth, "ops": sum(ops.values()), "while_loops": text.count("stablehlo.while"),
               "param_leaves": len(jax.tree.leaves(setup.abstract_state.params))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        print(f"ops per parameter leaf: {(b['ops'] - a['ops']) / max(1, b['param_leaves'] - a['param_leaves']):.1f}")


if __name__ == "__main__":
    main()
