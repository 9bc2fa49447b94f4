"""Our own training runs read back as models, under our own parameter names (pretrained/runs.py,
pretrained.deltatok.deltatok_from_run, pretrained.world.deltaworld_from_run): the trainer records the model
config next to its checkpoints and the forecast builds from it with no size flags; runs written before that
record have their sizes read off our parameter names, in both block layouts; the wrong family is refused."""

import dataclasses
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from deltaworld_jax import forecast
from deltaworld_jax.models.deltatok import DeltaTok, DeltaTokConfig
from deltaworld_jax.models.deltaworld import DeltaWorld, DeltaWorldConfig
from deltaworld_jax.models.dinoworld import DINOWorld, DINOWorldConfig
from deltaworld_jax.pretrained import common, runs
from deltaworld_jax.pretrained.deltatok import deltatok_from_run, infer_config
from deltaworld_jax.pretrained.world import deltaworld_from_run, infer_sizes
from deltaworld_jax.training import checkpointing


def _save_run(folder, model, kind: str | None = None) -> str:
    """As the trainer saves a run: the Orbax item `params` of step 3 in <folder>/checkpoints, and with `kind`
    the model config record (runs from before the record have none)."""
    directory = folder / "checkpoints"
    manager = ocp.CheckpointManager(directory, item_handlers={"params": ocp.StandardCheckpointHandler()})
    manager.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model, nnx.Param)))))
    manager.wait_until_finished()
    manager.close()
    if kind:
        checkpointing.write_model_config(str(directory), kind, model.cfg)
    return str(folder)


def _assert_same_params(got, expected) -> None:
    """Equal parameters, whatever the block layout of either model."""
    a, b = (common.unstack_layers(common.model_params(m)) for m in (got, expected))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _tokenizer(**kw):
    return DeltaTok(DeltaTokConfig(**{**dict(hidden_size=48, num_layers=2, num_heads=3, intermediate_size=32), **kw}),
                    rngs=nnx.Rngs(0))


def _world(cls=DeltaWorld, config_cls=DeltaWorldConfig, **kw):
    sizes = dict(hidden_size=32, num_layers=2, num_heads=2, backbone_hidden_size=48, rope_axis_sizes=(12,),
                 rope_unrotated_size=4)
    return cls(config_cls(**{**sizes, **kw}), rngs=nnx.Rngs(1))


def test_a_recorded_run_builds_with_no_size_flags_and_a_disagreeing_flag_is_named(tmp_path):
    # Sizes the tensors cannot tell: the tokenizer's heads (no per-head tensor) and RoPE theta, the world
    # model's heads, RoPE split and samples; both runs stored stacked.
    tok = _tokenizer(num_heads=4, use_qk_norm=False, use_gated_attn=False, rope_theta=50.0, scan_layers=True)
    world = _world(num_heads=4, rope_axis_sizes=(4,), rope_unrotated_size=4, num_samples_eval=3, scan_layers=True)
    tok_run, world_run = _save_run(tmp_path / "tok", tok, "deltatok"), _save_run(tmp_path / "world", world, "deltaworld")
    record = runs.read_model_config(world_run)
    assert record["kind"] == "deltaworld" and record["config"]["rope_axis_sizes"] == [4]

    loaded = forecast.load_models("pixel", tok_run, os.path.join(world_run, "checkpoints"), patch_size=4)
    assert loaded["tokenizer"].cfg == dataclasses.replace(tok.cfg, scan_layers=False)  # the forecast runs per-layer
    assert loaded["world"].cfg == dataclasses.replace(world.cfg, scan_layers=False)
    assert loaded["vfm"].num_heads == 4  # the pixel VFM takes the tokenizer's heads
    _assert_same_params(loaded["tokenizer"], tok)
    _assert_same_params(loaded["world"], world)

    with pytest.raises(forecast.ForecastInputError, match=r"trained with num_heads=4 \(not 2\)"):
        forecast.load_models("pixel", tok_run, world_run, patch_size=4, world_num_heads=2)


@pytest.mark.parametrize("stacked", [False, True])
def test_runs_without_a_record_read_their_sizes_off_our_names(tmp_path, stacked):
    tok = _tokenizer(scan_layers=stacked)  # gated attention: its heads are in the tensors
    world = _world(use_bom=False, scan_layers=stacked)
    tok_run, world_run = runs.read_run(_save_run(tmp_path / "tok", tok)), runs.read_run(_save_run(tmp_path / "w", world))
    assert tok_run.record is None and tok_run.step == 3 and (tok_run.family, world_run.family) == ("deltatok", "world")
    assert any(".stacked." in path for path in world_run.params) == stacked  # read as stored

    assert infer_config(tok_run.per_layer_params(), scan_layers=stacked) == tok.cfg
    sizes = infer_sizes(world_run.per_layer_params())
    assert sizes == {k: getattr(world.cfg, k) for k in ("hidden_size", "num_layers", "backbone_hidden_size", "mlp_ratio")}

    for scan_layers in (False, True):  # either stored layout fills either model layout
        _assert_same_params(deltatok_from_run(tok_run, scan_layers=scan_layers), tok)
        built = deltaworld_from_run(world_run, num_heads=2, rope_axis_sizes=(12,), scan_layers=scan_layers)
        assert not built.cfg.use_bom  # q_embed among the parameters: the deterministic variant
        _assert_same_params(built, world)


def test_the_other_family_is_refused_by_name(tmp_path):
    tok_run = _save_run(tmp_path / "tok", _tokenizer(), "deltatok")
    world_run = _save_run(tmp_path / "world", _world(), "deltaworld")
    dino_run = _save_run(tmp_path / "dino", _world(DINOWorld, DINOWorldConfig, rope_axis_sizes=(4, 4, 4)), "dinoworld")
    with pytest.raises(forecast.ForecastInputError, match="holds a DINO-World checkpoint"):
        forecast.load_models("pixel", tok_run, dino_run, patch_size=4)
    with pytest.raises(forecast.ForecastInputError, match="DeltaTok \\(tokenizer\\) checkpoint: pass it as --tokenizer"):
        forecast.load_models("pixel", tok_run, tok_run, patch_size=4)
    with pytest.raises(forecast.ForecastInputError, match="DeltaWorld \\(predictor\\) checkpoint: pass it as --world"):
        forecast.load_models("pixel", world_run, world_run, patch_size=4)
    with pytest.raises(ValueError, match="holds a deltaworld model, not a DeltaTok"):
        deltatok_from_run(runs.read_run(world_run))
    assert runs.read_run(tmp_path / "nothing") is None


def test_a_broken_record_is_a_clear_error(tmp_path):
    run = _save_run(tmp_path / "tok", _tokenizer(), "deltatok")
    (tmp_path / "tok" / "checkpoints" / runs.MODEL_CONFIG).write_text('{"kind": "deltatok"}')
    with pytest.raises(ValueError, match="not a model config record"):
        runs.read_run(run)


def test_the_trainer_records_the_model_config_of_its_run(tmp_path):
    """A tiny DeltaTok run of the real trainer: its record rebuilds the trained model, parameter for parameter."""
    from configs import tiny
    from deltaworld_jax.training import trainer

    out = trainer.run(tiny.get_config("deltatok"), str(tmp_path))
    run = runs.read_run(tmp_path)
    assert run.record["kind"] == "deltatok" and run.step == out["step"]
    trained = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            if hasattr(value, "items"):
                walk(value, f"{prefix}{key}.")
            else:
                trained[f"{prefix}{key}"] = np.asarray(value)

    walk(out["state"].params, "")
    model = deltatok_from_run(run)
    assert dataclasses.asdict(model.cfg) == {**run.record["config"], "scan_layers": False, "attention_impl": "xla"}
    got = common.unstack_layers(common.model_params(model))
    expected = common.unstack_layers(trained)
    assert got.keys() == expected.keys()
    for key in got:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
