"""`benchmark flops`: parameters per component, analytic FLOPs per training step and per forecast, and the
FLOPs XLA counts in the compiled real train step, side by side."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from deltaworld_jax import aot as program, flops as flops_lib, sharding as sharding_lib
from deltaworld_jax.models.deltatok import DeltaTok
from deltaworld_jax.training import mfu as model_info, trainer
from deltaworld_jax.training.mfu import ModelDims, train_step_flops  # noqa: F401  (the trainer's MFU count)

# The released evaluation setting (the paper; amazon-far/deltatok training/world.py): 512x512 crops, 4 context
# frames, 3 predicted frames, 20 samples, wide frames as two overlapping square crops.
RELEASED_FORECAST = dict(frame_hw=(512, 512), context=4, horizon=3, samples=20, crops=2)
# Published forecast cost of DeltaWorld (the paper's efficiency comparison), in FLOPs.
PUBLISHED_FORECAST_FLOPS = 31e12


def single_device_mesh():
    return sharding_lib.make_mesh(ml_collections.ConfigDict(dict(shape=dict(data=1, fsdp=1, tensor=1))),
                                  devices=jax.devices()[:1])


def model_dims(setup: trainer.Setup, config) -> ModelDims:
    return model_info.model_dims(config, setup.abstract_module, trainer.frozen_modules(setup))


def xla_train_step(config, batch: int) -> dict[str, Any]:
    """Compile the trainer's real step for `batch` clips (one micro-batch) on one local device and count
    its FLOPs twice: XLA's cost analysis and the traced program's matmuls."""
    cfg = program.benchmark_config(config, batch_size=batch, accumulation_steps=1,
                                   mesh_shape=dict(data=1, fsdp=1, tensor=1))
    mesh = single_device_mesh()
    lowered, step_fn, args, _ = program.lower_train_step(cfg, mesh)
    compiled = lowered.compile()
    xla, loops = flops_lib.xla_flops(compiled)
    with jax.set_mesh(mesh):
        counted, stats = flops_lib.jaxpr_matmul_flops(step_fn, *args)
    return {"xla": xla, "xla_while_loops": loops, "jaxpr_matmul": counted,
            "jaxpr_while_loops": stats.get("while_loops", 0)}


def forecast_flops(dims: ModelDims, *, frame_hw, context: int, horizon: int, samples: int, official_eval: bool):
    """(DeltaWorld forecast, DINO-World forecast with the same VFM and predictor sizes), per crop."""
    dw = None
    if dims.tokenizer is not None:
        dw = flops_lib.deltaworld_forecast(dims.vfm, dims.tokenizer, dims.predictor, frame_hw, context=context,
                                           horizon=horizon, samples=samples, official_eval=official_eval)
    dino = flops_lib.dinoworld_forecast(dims.vfm, dims.predictor, frame_hw, context=context, horizon=horizon,
                                        official_eval=official_eval)
    return dw, dino


def flops_report(config, *, xla: bool = True, xla_batch: int = 2) -> dict[str, Any]:
    """Everything `benchmark flops` prints, as a dict (tests read it)."""
    cfg = program.benchmark_config(config)
    setup = trainer.build(cfg, single_device_mesh(), abstract_frozen=True)
    dims = model_dims(setup, cfg)
    frame_hw = program.frame_hw(cfg)
    clip_frames = int(cfg.data.num_frames)
    from_tokens = program.trains_from_tokens(cfg)
    per_example = train_step_flops(dims, frame_hw, 1, clip_frames, from_tokens)
    report: dict[str, Any] = {
        "kind": dims.kind,
        "frame_hw": frame_hw,
        "clip_frames": clip_frames,
        "params": dims.params,
        "train_per_example": per_example,
        "train_per_step": {k: v * int(cfg.train.batch_size) for k, v in per_example.items()},
        "batch_size": int(cfg.train.batch_size),
    }
    if xla:
        counted = xla_train_step(cfg, xla_batch)
        analytic = flops_lib.total(train_step_flops(dims, frame_hw, xla_batch, clip_frames, from_tokens,
                                                    official=False))
        counted["analytic"] = analytic
        counted["batch"] = xla_batch
        counted["xla_vs_analytic"] = flops_lib.relative_difference(counted["xla"], analytic)
        counted["jaxpr_vs_analytic"] = flops_lib.relative_difference(counted["jaxpr_matmul"], analytic)
        report["xla_check"] = counted
    if dims.kind in ("deltaworld", "dinoworld") and dims.predictor is not None and dims.vfm is not None:
        forecast = {}
        for label, hw in (("config", frame_hw), ("released", RELEASED_FORECAST["frame_hw"])):
            for official_eval in (True, False):
                dw, dino = forecast_flops(dims, frame_hw=hw, context=RELEASED_FORECAST["context"],
                                          horizon=RELEASED_FORECAST["horizon"],
                                          samples=RELEASED_FORECAST["samples"], official_eval=official_eval)
                forecast[(label, official_eval)] = {"deltaworld": dw, "dinoworld": dino, "frame_hw": hw}
        report["forecast"] = forecast
        report["crops"] = RELEASED_FORECAST["crops"]
        n_released = dims.vfm.num_patches(RELEASED_FORECAST["frame_hw"])
        report["tokens_per_frame"] = {"dinoworld": n_released, "deltaworld": 1}
        q = clip_frames - 1
        world_train = {
            "dinoworld predictor (fwd+bwd)": flops_lib.predictor_train(dims.predictor, q * n_released, q * n_released),
        }
        if dims.num_candidates:
            world_train["deltaworld predictor (search + chosen)"] = (
                sum(flops_lib.predictor_forward(dims.predictor, q * dims.num_candidates, q))
                + flops_lib.predictor_train(dims.predictor, q, q))
        report["predictor_train_per_clip_released"] = world_train
        if xla:
            c = RELEASED_FORECAST
            counted = xla_forecast(setup, frame_hw, context=c["context"], horizon=c["horizon"], samples=c["samples"])
            dw, dino = forecast_flops(dims, frame_hw=frame_hw, context=c["context"], horizon=c["horizon"],
                                      samples=c["samples"], official_eval=False)
            analytic = flops_lib.total(dw if dims.kind == "deltaworld" else dino)
            counted.update(analytic=analytic, xla_vs_analytic=flops_lib.relative_difference(counted["xla"], analytic),
                           jaxpr_vs_analytic=flops_lib.relative_difference(counted["jaxpr_matmul"], analytic))
            report["xla_forecast_check"] = counted
    return report


def format_report(report: dict[str, Any]) -> str:
    f = flops_lib.format_flops
    lines = [f"model kind: {report['kind']}   frames: {report['clip_frames']} x {report['frame_hw']}   "
             f"global batch: {report['batch_size']}", "", "Parameters (abstract modules, nothing allocated):"]
    for name, count in report["params"].items():
        lines.append(f"  {name:32s} {count:>14,d}  ({count / 1e6:.2f} M)")
    lines += ["", "Analytic matmul FLOPs per training example (official computation):"]
    for name, value in report["train_per_example"].items():
        lines.append(f"  {name:42s} {f(value):>16s}")
    per_example = flops_lib.total(report["train_per_example"])
    lines.append(f"  {'total per example':42s} {f(per_example):>16s}")
    lines.append(f"  {'total per step (global batch)':42s} {f(per_example * report['batch_size']):>16s}")
    if "xla_check" in report:
        c = report["xla_check"]
        lines += ["", f"Compiled real train step, batch {c['batch']}, one device (analytic: what this implementation "
                      "computes; DeltaWorld encodes the black frame once per step):",
                  f"  analytic (matmuls)            {f(c['analytic']):>16s}",
                  f"  traced program (matmuls)      {f(c['jaxpr_matmul']):>16s}   "
                  f"diff {100 * c['jaxpr_vs_analytic']:.2f}%",
                  f"  XLA cost analysis (all ops)   {f(c['xla']):>16s}   diff {100 * c['xla_vs_analytic']:.2f}%"]
        if c["xla_while_loops"]:
            lines.append(f"  note: the compiled program has {c['xla_while_loops']} while loop(s); XLA counts a "
                         "loop body once, the traced count multiplies scans by their length")
    if "xla_forecast_check" in report:
        c = report["xla_forecast_check"]
        lines += ["", "Compiled forecast at the config's frame size (one clip, one crop, forecast only):",
                  f"  analytic (matmuls)            {f(c['analytic']):>16s}",
                  f"  traced program (matmuls)      {f(c['jaxpr_matmul']):>16s}   diff {100 * c['jaxpr_vs_analytic']:.2f}%",
                  f"  XLA cost analysis (all ops)   {f(c['xla']):>16s}   diff {100 * c['xla_vs_analytic']:.2f}%"]
    if "forecast" in report:
        crops = report["crops"]
        lines += ["", f"Forecast cost per clip (context 4, 3 predicted frames, 20 samples; x{crops} square "
                  "crops per wide frame):"]
        for (label, official_eval), entry in report["forecast"].items():
            what = "official eval (VFM + tokens of all 7 frames)" if official_eval else "forecast only (context)"
            lines.append(f"  [{label} {entry['frame_hw'][0]}x{entry['frame_hw'][1]}, {what}]")
            for model in ("deltaworld", "dinoworld"):
                b = entry[model]
                if b is None:
                    continue
                parts = ", ".join(f"{k} {f(v)}" for k, v in b.items())
                lines.append(f"    {model:10s} per crop {f(flops_lib.total(b)):>14s}   x{crops}: "
                             f"{f(crops * flops_lib.total(b)):>14s}   ({parts})")
        tokens = report["tokens_per_frame"]
        lines += ["", f"Tokens per frame at 512x512: DINO-World {tokens['dinoworld']}, DeltaWorld "
                      f"{tokens['deltaworld']} ({tokens['dinoworld']}x fewer)"]
        lines.append("Predictor FLOPs per training clip at 512x512 (fwd+bwd):")
        for name, value in report["predictor_train_per_clip_released"].items():
            lines.append(f"  {name:42s} {f(value):>16s}")
    return "\n".join(lines)


def xla_forecast(setup: trainer.Setup, frame_hw, *, context: int, horizon: int, samples: int) -> dict:
    """Compile one forecast of one clip (VFM on the context frames, plus the black frame for DeltaWorld's
    first token, then the model's own jittable rollout) and count its FLOPs: XLA and the traced matmuls.
    Forecast-only accounting: the target frames' features are not computed (zeros in their slots)."""
    from flax import nnx
    import jax.numpy as jnp

    roots = [setup.abstract_module, trainer.frozen_modules(setup)]
    world = setup.abstract_module
    vfm = model_info.vfm_module(roots)
    tok = model_info.first(roots, DeltaTok)
    grid = (frame_hw[0] // vfm.patch_size, frame_hw[1] // vfm.patch_size)
    graphdef, state = nnx.split((world, vfm, tok))

    def forecast(state, frames, timestamps, rng):
        world_m, vfm_m, tok_m = nnx.merge(graphdef, state)
        ctx = vfm_m(frames[:, :context])
        feats = jnp.concatenate([ctx, jnp.zeros((ctx.shape[0], horizon) + ctx.shape[2:], ctx.dtype)], axis=1)
        if tok_m is not None:
            black = vfm_m(jnp.zeros_like(frames[:, 0]))
            preds, _ = world_m.rollout(tok_m, feats, timestamps, grid_hw=grid, ctx_len=context, rng=rng,
                                       num_samples=samples, black_bnd=black)
        else:
            preds, _ = world_m.rollout(feats, timestamps, grid_hw=grid, ctx_len=context, rng=rng)
        return preds

    t = context + horizon
    args = (state, jax.ShapeDtypeStruct((1, t, *frame_hw, 3), jnp.uint8), jax.ShapeDtypeStruct((1, t), jnp.float32),
            jax.ShapeDtypeStruct((2,), jnp.uint32))
    compiled = jax.jit(forecast).lower(*args).compile()
    xla, loops = flops_lib.xla_flops(compiled)
    counted, _ = flops_lib.jaxpr_matmul_flops(forecast, *args)
    return {"xla": xla, "xla_while_loops": loops, "jaxpr_matmul": counted}
