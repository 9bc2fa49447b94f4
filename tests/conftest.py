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

# The tests in THIS process compile with LLVM at -O0 (XLA's HLO passes unchanged: the same program, less
# machine-code optimisation), as a C++ suite builds its tests unoptimised: most of a test's time is compiling
# tiny programs (a stacked-vs-per-layer gradient check: 16.9 -> 12.9 s), not running them. Their numbers can
# differ from -O2's in the last bits (e.g. the erf-based initialisers), which no test depends on. XLA reads
# XLA_FLAGS once per process, at its first compile, so the flag is set for that compile and taken out again:
# the subprocesses that run the documented commands (demo, recipe, notebooks, forecast, multi-process runs)
# compile as users do. DELTAWORLD_TEST_XLA_OPT=default runs the in-process tests at XLA's default level too.
IN_PROCESS_XLA_FLAGS = "--xla_backend_optimization_level=0"


def _checks_at_o0() -> bool:
    return os.environ.get("DELTAWORLD_TEST_XLA_OPT", "O0") == "O0"


def pytest_configure(config):
    """In pytest's own processes only (test scripts that import this module for its helpers, e.g. the
    multi-process workers, must not start JAX's backend before jax.distributed.initialize)."""
    del config
    if not _checks_at_o0():
        return
    user_xla_flags = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = f"{user_xla_flags or ''} {IN_PROCESS_XLA_FLAGS}".strip()
    try:
        jax.jit(lambda x: x + 1)(1.0).block_until_ready()
    finally:
        if user_xla_flags is None:
            del os.environ["XLA_FLAGS"]
        else:
            os.environ["XLA_FLAGS"] = user_xla_flags


JIT_CACHE_DIR = os.path.join(tempfile.gettempdir(), "deltaworld_jax_test_jit_cache")
JIT_CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": JIT_CACHE_DIR, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                 "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def repo_pythonpath() -> str:
    """PYTHONPATH for a subprocess: the repository first, then the caller's own entries."""
    return os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)


def check_env(devices: int = 1, *, cache: bool = True) -> dict[str, str]:
    """The environment of a subprocess that runs a CHECK, not a documented command (a fake multi-device mesh,
    several processes on localhost, a signal or a kill mid-run): CPU, this checkout and tests/ importable,
    the tests' compilation cache (unless `cache` is False), `devices` fake CPU devices, and compiled as the
    tests in pytest's own processes are (IN_PROCESS_XLA_FLAGS): these programs are the tests' own tiny ones,
    which LLVM's optimisation only makes slower to build (the 8-device sharding checks and the 2-process
    preemption test: about -20% each). The scripts must not set XLA_FLAGS themselves."""
    flags = [os.environ.get("XLA_FLAGS", "")]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    if _checks_at_o0():
        flags.append(IN_PROCESS_XLA_FLAGS)
    path = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), repo_pythonpath()])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path, "XLA_FLAGS": " ".join(f for f in flags if f)}
    if cache:
        env.update(JIT_CACHE_ENV)
    return env


def command_env(devices: int = 1) -> dict[str, str]:
    """The environment of a subprocess that runs one of the documented commands: CPU, the package importable
    from this checkout, the tests' compilation cache (runs of the same recipe share their programs), and
    `devices` fake CPU devices when more than one."""
    env = {**os.environ, **JIT_CACHE_ENV, "JAX_PLATFORMS": "cpu", "PYTHONPATH": repo_pythonpath()}
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


if not os.environ.get("DELTAWORLD_TEST_NO_JIT_CACHE"):
    jax.config.update("jax_compilation_cache_dir", JIT_CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
