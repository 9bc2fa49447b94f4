"""`benchmark fit`: the smallest TPU slice (and sharding, remat, per-chip batch) where a stage's train step
fits in HBM with headroom, from a few ahead-of-time compiles.

Compiles of the full recipe take minutes on a CPU host, so the search does not compile every candidate:
  1. probe: compile the real step on the smallest slice of the chip at per-chip micro-batches 1 and 2
     (FSDP, the model's remat policy, block_stack.DEFAULT_REMAT unless config.model.remat says otherwise;
     remat "full" too when batch 1 does not fit). Per-device memory is then
     mem(m) = state + code + m * activations, with the FSDP-sharded state shrinking as 1/chips;
  2. predict, for every slice of the chip, the largest power-of-two micro-batch that fits <= 90% HBM
     and the gradient accumulation that reaches the effective batch 1024;
  3. verify: compile the pick for the smallest slice that needs NO accumulation (per-chip batch =
     1024 / chips), and the smallest slice overall, and report the compiled numbers.
Every row says whether its memory was compiled or predicted.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from deltaworld_jax import aot
from deltaworld_jax.models import block_stack

HEADROOM = 0.9


def _probe(config, topology, sharding, remat, batch, log) -> dict[str, Any]:
    log(f"compiling {topology} sharding={sharding} remat={remat} per_chip_batch={batch} ...")
    r = aot.compile_on_topology(config, topology, sharding=sharding, per_chip_batch=batch, remat=remat)
    log(f"  -> {r['memory']['total'] / aot.GIB:.2f} GiB per device ({100 * r['memory']['hbm_fraction']:.1f}% "
        f"HBM), compile {r['compile_seconds']:.0f} s")
    return r


def memory_model(r1: dict, r2: dict, chips: int) -> dict[str, float]:
    """Per-device bytes: code + state * (chips / C) + other + per_example * m, from compiles (`aot` results) at
    two per-chip batches m1 < m2."""
    m1, m2 = r1["per_chip_batch"], r2["per_chip_batch"]
    if m2 <= m1:
        raise ValueError(f"the memory model needs two compiles at growing per-chip batches, got {m1} and {m2}")
    per_example = max(r2["memory"]["total"] - r1["memory"]["total"], 0.0) / (m2 - m1)
    code = r1["memory"]["generated_code"]
    state = r1["memory"]["arguments"]  # params + optimiser state + frozen modules + the batch (small)
    rest = r1["memory"]["total"] - code - state - m1 * per_example
    return {"code": code, "state": state, "other": max(rest, 0.0), "per_example": per_example,
            "probe_chips": chips}


def predict(model: dict[str, float], chips: int, hbm: float, sharded_state: bool = True) -> tuple[int, float]:
    """(largest power-of-two micro-batch that fits with headroom, predicted bytes at it) on `chips` chips."""
    state = model["state"] * (model["probe_chips"] / chips if sharded_state else 1.0)
    fixed = model["code"] + state + model["other"]
    limit = HEADROOM * hbm
    most = aot.EFFECTIVE_BATCH // chips
    if model["per_example"] <= 0:
        best = most
    else:
        best = int((limit - fixed) // model["per_example"])
    best = min(best, most)
    if best < 1:
        return 0, fixed + model["per_example"]
    best = 2 ** int(math.log2(best))
    return best, fixed + best * model["per_example"]


def smallest_fit(config, chip: str, *, log: Callable[[str], None] = print, verify: bool = True,
                 probe_sharding: str = "fsdp") -> dict[str, Any]:
    if chip not in aot.SLICES:
        raise ValueError(f"chip {chip!r}: expected one of {sorted(aot.SLICES)}")
    spec = aot.CHIPS[chip]
    topologies = [f"{chip}:{s}" for s in aot.SLICES[chip]]
    probe_topology = topologies[0]
    probe_chips = math.prod(aot.parse_topology(probe_topology)[1])
    remat = config.model.get("remat") or block_stack.DEFAULT_REMAT  # the model's own policy first, then "full"
    r1 = _probe(config, probe_topology, probe_sharding, remat, 1, log)
    if not aot.fits(r1, HEADROOM):
        remat = "full"
        r1 = _probe(config, probe_topology, probe_sharding, remat, 1, log)
    r2 = _probe(config, probe_topology, probe_sharding, remat, 2, log)
    model = memory_model(r1, r2, probe_chips)
    rows = []
    for topology in topologies:
        chips = math.prod(aot.parse_topology(topology)[1])
        hbm = spec.hbm_gib * aot.GIB * chips / (r1["devices"] / probe_chips * chips)
        batch, predicted = predict(model, chips, hbm)
        row = {"topology": topology, "chips": chips, "accelerator_type": aot.accelerator_type(chip, chips),
               "sharding": probe_sharding, "remat": remat, "per_chip_batch": batch,
               "accumulation_steps": aot.EFFECTIVE_BATCH // (chips * batch) if batch else None,
               "predicted_bytes": predicted, "hbm_bytes": hbm, "memory_source": "predicted"}
        if batch:
            roofline = r1["matmul_flops_per_step"] / r1["effective_batch"] * aot.EFFECTIVE_BATCH / chips / (
                spec.peak_bf16_tflops * 1e12)
            row["roofline_step_seconds"] = roofline
            row["roofline_samples_per_second_per_chip"] = aot.EFFECTIVE_BATCH / chips / roofline
        rows.append(row)
    fitting = [r for r in rows if r["per_chip_batch"]]
    smallest = fitting[0] if fitting else None
    no_accumulation = next((r for r in fitting if r["accumulation_steps"] == 1), None)
    if verify:
        for row in {id(r): r for r in (smallest, no_accumulation) if r is not None}.values():
            compiled = _probe(config, row["topology"], probe_sharding, remat, row["per_chip_batch"], log)
            row.update({"memory_source": "compiled", "compiled_bytes": compiled["memory"]["total"],
                        "compiled_fraction": compiled["memory"]["hbm_fraction"],
                        "fits": aot.fits(compiled, HEADROOM), "compile_seconds": compiled["compile_seconds"],
                        "xla_flops_per_device": compiled["xla_flops_per_device"]})
    return {"chip": chip, "kind": config.model.kind, "probe": {"topology": probe_topology, "model": model,
            "remat": remat, "sharding": probe_sharding, "m1": r1["memory"], "m2": r2["memory"],
            "matmul_flops_per_example": r1["matmul_flops_per_step"] / r1["effective_batch"]},
            "rows": rows, "smallest": smallest, "smallest_without_accumulation": no_accumulation}


def _smallest_lines(result: dict[str, Any]) -> list[str]:
    """The closing lines of both reports: the smallest slice, with and without gradient accumulation."""
    lines = []
    for key in ("smallest", "smallest_without_accumulation"):
        r = result[key]
        lines.append(f"{key.replace('_', ' ')}: " + (f"{r['topology']} ({r['accelerator_type']})" if r else "none"))
    return lines


def format_fit(result: dict[str, Any]) -> str:
    g = lambda b: f"{b / aot.GIB:6.2f} GiB"  # noqa: E731
    p = result["probe"]
    lines = [f"{result['kind']} on {result['chip']}: probes on {p['topology']} ({p['sharding']}, remat {p['remat']}): "
             f"per-device state {g(p['model']['state'])}, code {g(p['model']['code'])}, "
             f"activations {g(p['model']['per_example'])} per example"]
    for r in result["rows"]:
        mem = r.get("compiled_bytes", r["predicted_bytes"])
        lines.append(f"  {r['topology']:10s} {r['accelerator_type']:14s} per-chip batch {r['per_chip_batch']:4d} "
                     f"accumulation {r['accumulation_steps'] or '-'!s:>4s}  {g(mem)} / {g(r['hbm_bytes'])} "
                     f"({r['memory_source']})"
                     + (f"  roofline {r['roofline_step_seconds']:.3f} s/step" if "roofline_step_seconds" in r else ""))
    lines += _smallest_lines(result)
    return "\n".join(lines)


def model_from_one_compile(r: dict) -> dict[str, float]:
    """The memory model from ONE compile at per-chip batch m0: temporaries are taken as all per-example
    (an over-estimate by the gradient buffers, so predictions err on the safe side)."""
    m = r["memory"]
    return {"code": m["generated_code"], "state": m["arguments"], "other": m["outputs"] - m["aliased"],
            "per_example": m["temporaries"] / r["per_chip_batch"], "probe_chips": r["chips"]}


def predict_from_compiles(compiled: list[dict], chip: str) -> dict[str, Any]:
    """Predictions for every slice of `chip` from `aot` results (JSON dicts) of ONE stage: two compiles
    at different per-chip batches give the linear model, one compile the conservative one."""
    spec = aot.CHIPS[chip]
    compiled = sorted(compiled, key=lambda r: r["per_chip_batch"])
    if len({r["per_chip_batch"] for r in compiled}) >= 2:
        model = memory_model(compiled[0], compiled[-1], compiled[0]["chips"])
        source = "linear model from compiles at per-chip batches " + ", ".join(str(r["per_chip_batch"]) for r in compiled)
    else:
        model = model_from_one_compile(compiled[0])
        source = f"one compile at per-chip batch {compiled[0]['per_chip_batch']} (temporaries scaled with the batch)"
    flops_per_example = compiled[0]["matmul_flops_per_step"] / compiled[0]["effective_batch"]
    rows = []
    for shape in aot.SLICES[chip]:
        chips = math.prod(int(d) for d in shape.split("x"))
        hbm = spec.hbm_gib * aot.GIB
        batch, predicted = predict(model, chips, hbm)
        row = {"topology": f"{chip}:{shape}", "chips": chips, "accelerator_type": aot.accelerator_type(chip, chips),
               "per_chip_batch": batch, "predicted_bytes": predicted, "hbm_bytes": hbm,
               "accumulation_steps": aot.EFFECTIVE_BATCH // (chips * batch) if batch else None}
        if batch:
            row["roofline_step_seconds"] = flops_per_example * aot.EFFECTIVE_BATCH / chips / (
                spec.peak_bf16_tflops * 1e12)
        rows.append(row)
    fitting = [r for r in rows if r["per_chip_batch"]]
    return {"chip": chip, "kind": compiled[0]["config_kind"], "sharding": compiled[0]["sharding"],
            "remat": compiled[0]["remat"], "source": source, "model": model, "rows": rows,
            "smallest": fitting[0] if fitting else None,
            "smallest_without_accumulation": next((r for r in fitting if r["accumulation_steps"] == 1), None)}


def format_prediction(result: dict[str, Any]) -> str:
    g = lambda b: f"{b / aot.GIB:6.2f} GiB"  # noqa: E731
    m = result["model"]
    lines = [f"{result['kind']} on {result['chip']} ({result['sharding']}, remat {result['remat']}): {result['source']}; "
             f"per-device arguments {g(m['state'])} at {m['probe_chips']} chips (FSDP-sharded: scaled by chips), "
             f"code {g(m['code'])}, {g(m['per_example'])} per example"]
    for r in result["rows"]:
        lines.append(f"  {r['topology']:10s} {r['accelerator_type']:14s} per-chip batch {r['per_chip_batch']:4d} x "
                     f"accumulation {r['accumulation_steps'] or '-'!s:>4s}  predicted {g(r['predicted_bytes'])} / "
                     f"{g(r['hbm_bytes'])}" + (f"  roofline {r['roofline_step_seconds']:.3f} s/step"
                                               if "roofline_step_seconds" in r else ""))
    lines += _smallest_lines(result)
    return "\n".join(lines)
