"""Shared pytest set-up. Multi-device (fake CPU mesh) and multi-process cases run in subprocesses, since
XLA_FLAGS must be set before jax is imported; see tests/helpers.py."""

import os

# Keep every test on the CPU even where libtpu or a GPU build of jax is installed.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
