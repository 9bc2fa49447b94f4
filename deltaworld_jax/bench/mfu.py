"""Registers the analytic FLOPs per train step (`bench/flops.py`, what OUR step computes: official=False,
no recompute, so remat shows as lower MFU) as the trainer's MFU provider (`training/mfu.py`)."""

from __future__ import annotations

import types

from deltaworld_jax.bench import analysis, flops as flops_lib, program
from deltaworld_jax.training import mfu as training_mfu


def analytic_step_flops(config, trainable_module, frozen_modules) -> float:
    """Model FLOPs of one optimiser step of `config.train.batch_size` clips (accumulation included)."""
    setup = types.SimpleNamespace(trainable_module=trainable_module, frozen_module=frozen_modules)
    dims = analysis.model_dims(setup, config)
    return float(flops_lib.total(analysis.train_step_flops(
        dims, program.frame_hw(config), int(config.train.batch_size), int(config.data.num_frames),
        bool(config.data.get("use_cached_tokens", False)), official=False)))


training_mfu.register_flops_provider(analytic_step_flops)
