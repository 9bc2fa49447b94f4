"""configs/kinetics.py end to end, through the commands its docstring documents, on tiny real inputs:

  * training data: tiny H.264 videos prepared into ArrayRecord shards by the real writer (data/prepare.py);
  * the frozen VFM: a random `transformers` DINOv3ViTModel saved with save_pretrained (`vfm.weights`);
  * DeltaWorld's tokenizer: once an official-format DeltaTok pytorch_model.bin (official module names, built
    from the official module tree), once the recipe's own DeltaTok stage ('@deltatok_cooldown2');
  * validation: VSPW / Cityscapes / KITTI fixtures in their official layouts, read by official-format heads.

Sizes are shrunk by command-line overrides (32 px frames, width 32, one block, 2 steps per stage), so the
step programs stay tiny; the persistent compilation cache (conftest.JIT_CACHE_ENV) shares them between the
stages and the runs. Also here: the recipe's clear errors (unknown config fields, bad data settings) and
the evaluation being switched off, with its reason, when no validation root is given."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import check_env, command_env
from test_data_fixtures import make_cityscapes, make_kinetics_tree, make_kitti, make_vspw

REPO = pathlib.Path(__file__).resolve().parents[1]
WIDTH, HEADS = 32, 4  # the tiny DINOv3 (and so DeltaTok): head_dim 8
DELTATOK_STAGES = ("deltatok_256", "deltatok_512", "deltatok_cooldown1", "deltatok_cooldown2")
WORLD_STAGES = ("deltaworld_512", "deltaworld_cooldown")
# 2 steps per stage; the cool-downs continue the count of the stage they resume (as 550k after 500k).
STEPS = {"deltatok_256": 2, "deltatok_512": 2, "deltatok_cooldown1": 4, "deltatok_cooldown2": 6,
         "deltaworld_512": 2, "deltaworld_cooldown": 4}




def _main(args: list[str], devices: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m deltaworld_jax.main <args>` from the repository root, as the docstring runs it."""
    return subprocess.run([sys.executable, "-m", "deltaworld_jax.main", *args], cwd=REPO, env=command_env(devices),
                          capture_output=True, text=True, timeout=timeout)


def _save_torch(state: dict, path: pathlib.Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}, path)


def _official_deltatok_state(seed: int = 0) -> dict:
    """The official DeltaTok module tree (transformers' DINOv3ViTLayer blocks with q/k norms and the attention
    gate, z/xy embeddings, final norm) at the tiny sizes, with small random weights: its state_dict has the
    released checkpoint's names and layouts."""
    import torch
    from transformers.models.dinov3_vit import modeling_dinov3_vit as hf

    cfg = hf.DINOv3ViTConfig(hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=64, key_bias=False,
                             use_gated_mlp=True, hidden_act="silu", layerscale_value=0.1)
    root = torch.nn.Module()
    root.z_embed = torch.nn.Embedding(1, WIDTH)
    root.xy_embed = torch.nn.Embedding(2, WIDTH)
    for stack in ("encoder_blocks", "decoder_blocks"):
        blocks = torch.nn.ModuleList([hf.DINOv3ViTLayer(cfg)])
        for block in blocks:
            block.attention.q_norm = torch.nn.LayerNorm(WIDTH // HEADS, bias=False)
            block.attention.k_norm = torch.nn.LayerNorm(WIDTH // HEADS, bias=False)
            block.attention.attn_gate = torch.nn.Linear(WIDTH, HEADS, bias=True)
        setattr(root, stack, blocks)
    root.norm = torch.nn.LayerNorm(WIDTH)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in root.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    return {k: v.numpy() for k, v in root.state_dict().items()}


def _probe_head(outputs: int, rng) -> dict:
    """An official linear probe (BatchNorm2d + 1x1 conv) state dict."""
    return {"bn.weight": 1 + 0.1 * rng.standard_normal(WIDTH), "bn.bias": 0.1 * rng.standard_normal(WIDTH),
            "bn.running_mean": 0.1 * rng.standard_normal(WIDTH), "bn.running_var": 1 + rng.random(WIDTH),
            "bn.num_batches_tracked": np.array(0, np.int64),
            "head.weight": rng.standard_normal((outputs, WIDTH, 1, 1)).astype(np.float32),
            "head.bias": rng.standard_normal(outputs).astype(np.float32)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    return build_inputs(tmp_path_factory.mktemp("kinetics_inputs"))


def build_inputs(root: pathlib.Path) -> dict:
    """Every input of the recipe, in its real format, under `root`."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from deltaworld_jax.data import prepare

    videos = make_kinetics_tree(root / "k700", num_videos=3, num_frames=30, corrupt=False)
    data = root / "k700_arrayrecord"
    assert prepare.prepare(str(videos), str(data), num_shards=1, exclude_list="")["written"] == 1
    torch.manual_seed(0)
    dinov3 = root / "dinov3-tiny"
    DINOv3ViTModel(DINOv3ViTConfig(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=HEADS, patch_size=16, num_register_tokens=4)).save_pretrained(dinov3)
    deltatok = root / "deltatok-kinetics" / "pytorch_model.bin"
    _save_torch(_official_deltatok_state(), deltatok)
    rng = np.random.default_rng(0)
    heads = {}
    for name, outputs in (("vspw", 124), ("cityscapes", 19), ("kitti", 256)):
        kind = "depth-head-kitti" if name == "kitti" else f"seg-head-{name}"
        heads[name] = root / kind / "pytorch_model.bin"
        _save_torch(_probe_head(outputs, rng), heads[name])
    vspw = make_vspw(root / "vspw", num_videos=1, num_frames=20)  # one clip (ends at frame 19)
    cityscapes = make_cityscapes(root / "cityscapes")  # two clips
    kitti, kitti_split = make_kitti(root / "kitti", frames=(30,))  # one clip
    return dict(data=data, dinov3=dinov3, deltatok=deltatok, heads=heads, roots=dict(
        vspw=vspw, cityscapes=cityscapes, kitti=kitti), kitti_split=kitti_split)


def _stage_overrides(stage: str, inputs: dict, prefix: str = "config.") -> list[str]:
    """Command-line overrides that shrink one stage (sizes, 32 px, batch 2, float32 on the CPU)."""
    values = {"data.root": inputs["data"], "data.frame_size": 32, "data.num_workers": 0, "data.read_threads": 1,
              "train.batch_size": 2, "train.num_steps": STEPS[stage], "train.log_every_steps": 1,
              "vfm.weights": inputs["dinov3"], "vfm.dtype": "float32", "model.dtype": "float32",
              # One learning rate for all: the stages of a family then run ONE step program (lr is a constant
              # in it), compiled once and read from the persistent cache after.
              "optim.lr": 1e-4}
    if stage in WORLD_STAGES:
        values.update({"model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2,
                       "model.rope_axis_sizes": "(12,)", "model.num_samples_train": 4, "model.num_samples_eval": 2,
                       "model.bom_chunk": 0, "tokenizer.dtype": "float32"})
    elif stage == "deltatok_256":  # the later DeltaTok stages (and the tokenizer) share these in a recipe
        values.update({"model.num_layers": 1, "model.intermediate_size": 64})
    return [f"--{prefix}{key}={value}" for key, value in values.items()]


def _eval_overrides(inputs: dict, prefix: str = "config.") -> list[str]:
    """The documented evaluation flags, on the fixture sets; small evaluation settings."""
    values = {f"data.eval.{name}.root": root for name, root in inputs["roots"].items()}
    values.update({f"eval.heads.{name}": path for name, path in inputs["heads"].items()})
    values.update({"data.eval.kitti.split_file": inputs["kitti_split"], "eval.datasets": "vspw,cityscapes,kitti",
                   "eval.num_samples": 2, "eval.num_plots": 0, "eval.max_batches": 1})
    return [f"--{prefix}{key}={value}" for key, value in values.items()]


def _results(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def _assert_scored(results: dict, model: str) -> None:
    """Every set scored with its head's metric at 1 frame, finite."""
    for name, metric in (("vspw", "miou"), ("cityscapes", "miou"), ("kitti", "rmse")):
        entry = results[name][model]
        first = next(iter(entry.values()))["mean"]["t0"]
        assert np.isfinite(first[metric]) and np.isfinite(first["loss"]), (name, model, first)


def test_kinetics_every_stage_end_to_end(inputs, tmp_path):
    # 1. recipe=all: DeltaTok's four stages, then DeltaWorld's two on the DeltaTok just trained, chained by
    #    the recipe's own '@stage' references; no validation roots -> evaluation off, with the reason logged.
    workdir = tmp_path / "recipe"
    args = ["--config=configs/kinetics.py:recipe=all", f"--workdir={workdir}", "--mode=recipe"]
    for stage in DELTATOK_STAGES + WORLD_STAGES:
        args += _stage_overrides(stage, inputs, prefix=f"config.stage_configs.{stage}.")
    run = _main(args)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    for stage in DELTATOK_STAGES + WORLD_STAGES:
        assert (workdir / stage / "checkpoints" / str(STEPS[stage])).is_dir(), (stage, log[-3000:])
        assert f"Stage {stage}: evaluation OFF: no validation set has data" in log
    # The cool-downs resumed (the step counter continued); deltatok_512 started from 256's weights at step 0.
    assert "Resuming from" in log and not (workdir / "deltatok_512" / "checkpoints" / "4").exists()

    # Our DeltaTok run as a stand-alone DeltaWorld's tokenizer needs its sizes: a mismatch is named.
    sys.path.insert(0, str(REPO / "configs"))
    import kinetics

    sys.path.pop(0)
    from deltaworld_jax import tasks

    alone = kinetics.get_config("stage=deltaworld_512")
    alone.vfm.weights, alone.vfm.dtype = str(inputs["dinov3"]), "float32"
    alone.tokenizer.checkpoint = str(workdir / "deltatok_cooldown2" / "checkpoints")
    with pytest.raises(ValueError, match=r"does not match the tokenizer config.tokenizer describes \(num_layers=12"):
        tasks.make_task(alone).build_tokenizer(tasks.make_task(alone)._build_vfm())

    # 2. The same command with --mode=eval: the two final stages, on the fixture validation sets.
    eval_args = [a for a in args if a != "--mode=recipe"] + ["--mode=eval",
                                                             "--stages=deltatok_cooldown2,deltaworld_cooldown"]
    for stage in ("deltatok_cooldown2", "deltaworld_cooldown"):
        eval_args += _eval_overrides(inputs, prefix=f"config.stage_configs.{stage}.")
        eval_args.append(f"--config.stage_configs.{stage}.eval.results_dir={workdir / stage}")
    run = _main(eval_args)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    _assert_scored(_results(workdir / "deltatok_cooldown2" / "eval_results_6.json"), "deltatok")
    world = _results(workdir / "deltaworld_cooldown" / "eval_results_4.json")
    _assert_scored(world, "deltaworld")
    _assert_scored(world, "copy_last")
    assert set(world["vspw"]["deltaworld"]["c4_h3"]) == {"best", "mean"}

    # 3. A stand-alone stage that starts from another run: deltatok_512 from the recipe's deltatok_256.
    alone = tmp_path / "tok512"
    run = _main(["--config=configs/kinetics.py:stage=deltatok_512", f"--workdir={alone}",
                 f"--config.train.init_from={workdir / 'deltatok_256' / 'checkpoints'}"]
                + _stage_overrides("deltatok_256", inputs))  # the recipe's sizes (set there on deltatok_256)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    assert (alone / "checkpoints" / "2").is_dir()


def test_kinetics_deltaworld_stage_with_official_tokenizer_evaluates_while_training(inputs, tmp_path):
    """The docstring's stand-alone DeltaWorld command with the released-format DeltaTok and its evaluation
    flags (every_steps, datasets, roots, heads)."""
    workdir = tmp_path / "world"
    args = ["--config=configs/kinetics.py:stage=deltaworld_512", f"--workdir={workdir}",
            f"--config.tokenizer.checkpoint={inputs['deltatok']}", "--config.eval.every_steps=2",
            f"--config.eval.results_dir={workdir}"]
    args += _stage_overrides("deltaworld_512", inputs) + _eval_overrides(inputs)
    run = _main(args)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    assert "evaluating vspw,cityscapes,kitti every 2 steps" in log
    assert (workdir / "checkpoints" / "2").is_dir()
    results = _results(workdir / "eval_results_2.json")
    _assert_scored(results, "deltaworld")
    _assert_scored(results, "copy_last")


# ---- the frozen VFM from real weights, placed by our rules --------------------------------------------------

BUILD_WITH_WEIGHTS = """
import sys, json
sys.path.insert(0, "configs")
import jax
import kinetics
from deltaworld_jax.training import trainer
config = kinetics.get_config("stage=deltatok_256")
config.vfm.weights, config.vfm.dtype = sys.argv[1], "float32"
config.model.update(dict(num_layers=1, intermediate_size=64))
config.mesh.shape = dict(data=1, fsdp=-1, tensor=1)
setup = trainer.build(config)
specs = {jax.tree_util.keystr(k): [list(a) if isinstance(a, tuple) else a for a in v.sharding.spec]
         for k, v in jax.tree_util.tree_flatten_with_path(setup.frozen_state)[0]}
print(json.dumps(specs))
"""


def test_build_loads_dinov3_weights_and_places_them_by_the_mesh_rules(inputs):
    """trainer.build with config.vfm.weights (a transformers folder) on an FSDP mesh of 2 devices: the loaded
    DINOv3 is split over 'fsdp' along its logical 'embed' dims (our rules), not replicated, not an error."""
    run = subprocess.run([sys.executable, "-c", BUILD_WITH_WEIGHTS, str(inputs["dinov3"])], cwd=REPO,
                         env=check_env(devices=2), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    specs = json.loads(run.stdout.strip().splitlines()[-1])
    assert specs["['embeddings']['cls_token']"] == [None, None, "fsdp"]
    # The recipe stores the blocks stacked (config.vfm.scan_layers): [layers, embed, heads], layers unsharded.
    assert specs["['layer']['stacked']['attention']['q_proj']['kernel']"][:2] == [None, "fsdp"]
    assert specs["['embeddings']['patch_embeddings']['kernel']"][-1] == "fsdp"


# ---- clear errors before anything is built ---------------------------------------------------------------


def test_unknown_config_fields_are_named_with_the_nearest_known_ones(tmp_path):
    run = _main(["--config=configs/kinetics.py:stage=deltatok_256", f"--workdir={tmp_path}",
                 "--config.train.no_such_field=1"], timeout=120)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "config.train has no field 'no_such_field'" in run.stderr and "Nearest: " in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    from deltaworld_jax import main

    base = ["main", "--config=configs/kinetics.py:stage=deltatok_256", "--workdir=x"]
    top = main.unknown_field_message(base + ["--config.no_such_field=1"])
    assert "config has no field 'no_such_field'" in top and "Nearest: " in top
    assert "Nearest: config.train.num_steps" in main.unknown_field_message(base + ["--config.train.num_step=3"])
    assert "Nearest: config.data.source" in main.unknown_field_message(base + ["--config.data.sorce=videos"])
    assert main.unknown_field_message(base + ["--config.train.num_steps=3", "--config.eval.heads.vspw=x"]) is None
    recipe = main.unknown_field_message(["main", "--config=configs/kinetics.py:recipe=all", "--config.data.root=/d"])
    assert "--config.stage_configs.<stage>.data.root" in recipe


def _stage(name: str, **data):
    sys.path.insert(0, str(REPO / "configs"))
    try:
        import kinetics
    finally:
        sys.path.pop(0)
    config = kinetics.get_config(f"stage={name}")
    config.data.update(data)
    return config


def test_bad_data_settings_are_found_before_anything_is_built(inputs, monkeypatch, tmp_path):
    from deltaworld_jax.training import recipe, trainer

    def no_build(*args, **kwargs):
        raise AssertionError("built before the config was validated")

    monkeypatch.setattr(trainer, "build", no_build)
    with pytest.raises(ValueError, match=r"config.data.source='bogus' is not a known source; known: synthetic, "
                                         r"videos, frames, arrayrecord"):
        trainer.run(_stage("deltatok_256", source="bogus"), str(tmp_path))
    with pytest.raises(ValueError, match=r"config.data.root is empty: the 'arrayrecord' source reads the folder "
                                         r"written by `python -m deltaworld_jax.data.prepare`"):
        trainer.run(_stage("deltatok_256", root=""), str(tmp_path))
    with pytest.raises(ValueError, match=r"config.data.root='/no/such/k700' does not exist"):
        trainer.run(_stage("deltatok_256", root="/no/such/k700"), str(tmp_path))
    with pytest.raises(ValueError, match=r"holds no \*.array_record shards"):
        trainer.run(_stage("deltatok_256", root=str(inputs["roots"]["vspw"])), str(tmp_path))
    config = _stage("deltatok_256", root=str(inputs["data"]))
    config.data.eval.vspw.root = "/no/such/vspw"
    with pytest.raises(ValueError, match=r"config.data.eval.vspw.root='/no/such/vspw' does not exist"):
        trainer.run(config, str(tmp_path))
    config = _stage("deltatok_256", root=str(inputs["data"]))
    config.eval.datasets = "vspw,ade20k"
    with pytest.raises(ValueError, match=r"unknown set\(s\) \['ade20k'\]"):
        trainer.run(config, str(tmp_path))
    # A recipe checks every stage's data before its first stage trains.
    sys.path.insert(0, str(REPO / "configs"))
    import kinetics

    sys.path.pop(0)
    full = kinetics.get_config("recipe=all")
    for stage in full.stages:
        full.stage_configs[stage].data.root = str(inputs["data"])
    full.stage_configs.deltaworld_cooldown.data.root = "/no/such/k700"
    with pytest.raises(ValueError, match=r"Stage deltaworld_cooldown: config.data.root='/no/such/k700' does not "
                                         r"exist.*--config.stage_configs.deltaworld_cooldown"):
        recipe.run_recipe(full, str(tmp_path))


def test_evaluation_is_declared_by_every_stage_and_off_without_roots(inputs):
    from deltaworld_jax.evaluation import setup as eval_setup

    sys.path.insert(0, str(REPO / "configs"))
    import kinetics

    sys.path.pop(0)
    full = kinetics.get_config("recipe=all")
    for stage in full.stages:
        config = full.stage_configs[stage]
        assert config.eval.fn == "deltaworld_jax.evaluation.protocol:eval_hook"
        assert eval_setup.datasets(config.eval) == ("vspw", "cityscapes", "kitti") and config.eval.every_steps > 0
        assert set(config.eval.heads) == {"vspw", "cityscapes", "kitti"}
        off = eval_setup.configure(config, stage)
        assert off.eval.every_steps == 0 and eval_setup.datasets(off.eval) == ()
    config = kinetics.get_config("stage=deltatok_256")
    config.data.eval.kitti.root = str(inputs["roots"]["kitti"])
    only_kitti = eval_setup.configure(config)
    assert eval_setup.datasets(only_kitti.eval) == ("kitti",) and only_kitti.eval.every_steps == 5000
    assert eval_setup.active(config)[1] == ["vspw: config.data.eval.vspw.root is empty",
                                            "cityscapes: config.data.eval.cityscapes.root is empty"]
