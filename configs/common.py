"""What every config starts from: the trainer's defaults (the official optimiser, checkpoint and logging
recipe) and the mesh rules, as config data the command line can override."""

from __future__ import annotations

import ml_collections

# Logical axis name (the names the models give their parameters and activations) -> mesh axis, axes, or
# None (replicated). Data parallel, FSDP and FSDP + tensor parallel differ only in config.mesh.shape: an
# axis of size 1 shards nothing. Override with --config.mesh.rules="(('embed', 'fsdp'), ...)".
MESH_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", None),
    ("norm", None),
    # The leading axis of blocks stored stacked (models/block_stack.BlockStack): each device keeps every layer of
    # its shard, and the scan slices one layer at a time.
    ("layers", None),
)

# The default attention kernel of every module (see models/attention.py). "auto" (splash on TPU, cuDNN on GPU,
# xla on CPU) is checked on CPU (splash in Pallas interpret mode) and by TPU ahead-of-time compiles, not yet on
# TPU or GPU hardware, so the default stays "xla"; --config.model.attention_impl=auto (and vfm./tokenizer.)
# opts in.
ATTENTION_IMPL = "xla"


def base_config() -> ml_collections.ConfigDict:
    """Trainer defaults shared by every config: the official optimiser, checkpoint and logging recipe."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # attention_impl: the attention kernel of the trained model (models/attention.py): auto (splash on TPU,
    # cuDNN on GPU for bf16/fp16, xla on CPU) | xla | cudnn | splash | reference. The frozen modules have
    # their own key: config.vfm.attention_impl, config.tokenizer.attention_impl (DeltaWorld).
    c.model = ml_collections.ConfigDict({"kind": "", "dtype": "bfloat16", "attention_impl": ATTENTION_IMPL})
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=5000, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=0.0,
        accumulation_steps=1, max_consecutive_nonfinite=10))  # non-finite updates are skipped; this many in a row stop
    # compilation_cache: JAX's persistent compilation cache ('' off; relative = under the workdir, or gs://...)
    # profile_steps: a profiler trace of that many steps (0: none), profile_after_steps after the run (re)starts,
    # written to <workdir>/plugins/profile/ (training/metrics.py Profiler: clu's periodic_actions.Profile).
    c.train = ml_collections.ConfigDict(dict(batch_size=1024, num_steps=1, log_every_steps=50, init_from="",
                                             resume_from="", write_metrics=True, compilation_cache="jax_cache",
                                             profile_steps=0, profile_after_steps=5))
    # Official: `last` every 500 steps, plus every 50,000 steps kept forever.
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep_last=2, keep_period=50_000,
                                                  async_save=True))
    c.mesh = ml_collections.ConfigDict(dict(shape=dict(data=-1, fsdp=1, tensor=1), rules=MESH_RULES))
    c.eval = ml_collections.ConfigDict(dict(every_steps=0, fn=""))
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))
    return c
