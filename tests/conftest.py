"""Shared pytest set-up. Multi-device (fake CPU mesh) and multi-process cases run in subprocesses, since
XLA_FLAGS must be set before jax is imported.

Many tests compile the same tiny programs (a DeltaTok step, a rollout): JAX's persistent compilation cache
shares the compiled executables between the tests of a worker and between the two xdist workers. It is set
here, for every test of the session, not as a side effect of importing one test module. Subprocesses that
want it get JIT_CACHE_ENV (multi-process runs compile their own)."""

import os
import sys
import tempfile

# The repository's root: tests import the configs package (`from configs import common`) as configs do.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# Keep every test on the CPU even where libtpu or a GPU build of jax is installed.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after JAX_PLATFORMS)

JIT_CACHE_DIR = os.path.join(tempfile.gettempdir(), "deltaworld_jax_test_jit_cache")
JIT_CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": JIT_CACHE_DIR, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                 "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
if not os.environ.get("DELTAWORLD_TEST_NO_JIT_CACHE"):
    jax.config.update("jax_compilation_cache_dir", JIT_CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
