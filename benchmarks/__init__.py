"""Scripts and modules that only measure (FLOPs, step time and MFU, fits of TPU slices, the data pipeline,
side by side with the official code). Run from the repository's root: `python -m benchmarks.benchmark ...`,
`python -m benchmarks.data`, `python benchmarks/<script>.py`. The package keeps what real runs use: the AOT
compile check (deltaworld_jax/aot.py) and the analytic FLOPs (deltaworld_jax/flops.py)."""
