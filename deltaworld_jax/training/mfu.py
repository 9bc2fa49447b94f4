"""MFU for the training loop: model FLOPs per optimiser step x steps/s / the peak FLOP/s of the devices.

The peak is the dense bf16 peak per device kind (PEAK_BF16_TFLOPS) times the devices of the mesh; on a
device kind not in the table (a CPU, an unknown accelerator) there is no MFU, only the model FLOP/s.
The FLOPs per step come from a provider registered by `deltaworld_jax.bench.mfu` (the analytic counts of
`bench/flops.py`; the bench floor sits above training, so it registers itself rather than being imported
here). `deltaworld_jax.main` imports it; without a provider the trainer logs no MFU.
"""

from __future__ import annotations

from typing import Any, Callable

from absl import logging

# Dense bf16 peak FLOP/s per device (datasheets). TPU v4/v5p devices are whole chips (megacore).
PEAK_BF16_TFLOPS = {
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,  # v5p reports device_kind "TPU v5"
    "TPU v6 lite": 918.0,  # v6e
    "TPU v6e": 918.0,
}


def peak_flops(device) -> float | None:
    """Peak bf16 FLOP/s of `device`, or None where no peak is known (CPUs: report FLOP/s only)."""
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    for name in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            return PEAK_BF16_TFLOPS[name] * 1e12
    return None


# (config, trainable module, frozen modules) -> model FLOPs of one optimiser step; raises ValueError
# where the config's model has no count.
FlopsProvider = Callable[[Any, Any, Any], float]
_PROVIDER: list[FlopsProvider] = []


def register_flops_provider(fn: FlopsProvider) -> None:
    _PROVIDER[:] = [fn]


class MFUMeter:
    """`meter(steps_per_second)` -> {"model_tflops_per_second", "mfu" (only with a known peak)}; {} when
    there are no FLOPs for the config."""

    def __init__(self, flops_per_step: float | None, peak_flops_total: float | None):
        self.flops_per_step = flops_per_step
        self.peak_flops_total = peak_flops_total

    @classmethod
    def for_training(cls, config, mesh, trainable_module, frozen_modules) -> "MFUMeter":
        """From the trainer's modules and mesh; never raises (logs why there is no MFU)."""
        devices = list(mesh.devices.flat)
        peak = peak_flops(devices[0])
        peak_total = peak * len(devices) if peak else None
        if not _PROVIDER:
            logging.info("No MFU: no FLOPs provider registered (import deltaworld_jax.bench.mfu)")
            return cls(None, peak_total)
        try:
            flops = float(_PROVIDER[0](config, trainable_module, frozen_modules))
        except (ValueError, AttributeError, KeyError, TypeError) as e:
            logging.info("No MFU: no analytic FLOPs for this config (%s)", e)
            return cls(None, peak_total)
        return cls(flops, peak_total)

    def __call__(self, steps_per_second: float) -> dict[str, Any]:
        if self.flops_per_step is None:
            return {}
        achieved = self.flops_per_step * steps_per_second
        out = {"model_tflops_per_second": achieved / 1e12}
        if self.peak_flops_total:
            out["mfu"] = achieved / self.peak_flops_total
        return out
