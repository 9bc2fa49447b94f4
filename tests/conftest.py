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
import pytest  # noqa: E402

# The tests compile with `jax_disable_most_optimizations` (LLVM at -O0, its expensive passes off; XLA's HLO
# passes unchanged: the same program, less machine-code optimisation), as a C++ suite builds its tests
# unoptimised: most of a check's time is compiling tiny programs, not running them (a stacked-vs-per-layer
# gradient check: 16.9 -> 12.9 s). Their numbers can differ from the optimised build's in the last bits (e.g. the
# erf-based initialisers), which no test depends on. It is JAX's per-compile option (read at every compile, part of
# the compilation cache's key), so a test that runs a documented command in this process switches it off for its
# duration (the `compiled_as_users_do` fixture): the commands users run are tested as users compile them, and their
# heavier programs run faster optimised (the README's folder forecast: 27.5 s at -O0, 20.2 s optimised).
# Subprocesses that run documented commands (demo, recipe, notebooks) never get it; those that run checks (fake
# meshes, several processes, kills) do, through check_env. DELTAWORLD_TEST_XLA_OPT=default turns it off everywhere.
def _checks_unoptimised() -> bool:
    return os.environ.get("DELTAWORLD_TEST_XLA_OPT", "O0") == "O0"


# Tests that compile the same programs in a subprocess or a notebook kernel are marked with one xdist_group
# (pytest.ini distributes with --dist=loadgroup): run on the same xdist worker, one after the other, the later
# ones load the programs the first compiled from the tests' compilation cache (JIT_CACHE_ENV); spread over both
# workers they ran at the same time and each compiled them (the quickstart notebook after the demo's tests:
# 36 s alone -> 22 s).
DEMO_RECIPE_PROGRAMS = pytest.mark.xdist_group("demo_recipe_programs")  # configs/demo.py:quick's stages


def pytest_configure(config):
    """In pytest's own processes only (test scripts that import this module for its helpers, e.g. the
    multi-process workers, take check_env's environment instead)."""
    del config
    jax.config.update("jax_disable_most_optimizations", _checks_unoptimised())


@pytest.fixture
def compiled_as_users_do():
    """For a test that runs a documented command in this process: its programs compile with XLA's default
    optimisation, as the user's do."""
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", _checks_unoptimised())


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
    tests in pytest's own processes are (jax_disable_most_optimizations): these programs are the tests' own tiny ones,
    which LLVM's optimisation only makes slower to build (the 8-device sharding checks and the 2-process
    preemption test: about -20% each). The scripts must not set XLA_FLAGS themselves."""
    env = _subprocess_env(devices, cache=cache,
                          pythonpath=os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), repo_pythonpath()]))
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1" if _checks_unoptimised() else "0"
    return env


def command_env(devices: int = 1) -> dict[str, str]:
    """The environment of a subprocess that runs one of the documented commands: CPU, the package importable
    from this checkout, the tests' compilation cache (runs of the same recipe share their programs), and
    `devices` fake CPU devices when more than one; compiled as users do."""
    env = _subprocess_env(devices, cache=True, pythonpath=repo_pythonpath())
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    return env


def _subprocess_env(devices: int, *, cache: bool, pythonpath: str) -> dict[str, str]:
    """What check_env and command_env share: this environment on the CPU, `pythonpath`, `devices` fake CPU
    devices (after the caller's own XLA_FLAGS) and, with `cache`, the tests' compilation cache."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": pythonpath}
    if devices > 1:
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    if cache:
        env.update(JIT_CACHE_ENV)
    return env


if not os.environ.get("DELTAWORLD_TEST_NO_JIT_CACHE"):
    jax.config.update("jax_compilation_cache_dir", JIT_CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
