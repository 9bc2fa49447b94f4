"""The forecast command end-to-end on a tiny generated video with tiny random models saved under the official
names, and its error cases."""

import json
import os

import av
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import deltaworld_jax  # noqa: F401
from deltaworld_jax import forecast
from deltaworld_jax.models.deltatok import DeltaTok, DeltaTokConfig
from deltaworld_jax.models.deltaworld import DeltaWorld, DeltaWorldConfig
from deltaworld_jax.pretrained.world import world_state_dict


def _write_video(path, num_frames=15, fps=10, hw=(24, 32)):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = hw[1], hw[0], "yuv420p"
        for i in range(num_frames):
            frame = np.zeros((*hw, 3), np.uint8)
            frame[:, (2 * i) % hw[1]:(2 * i) % hw[1] + 6] = (255, 128, 0)  # a moving bar
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("weights")
    # Pixel VFM with 4x4 patches: width 48, 3 heads of 16.
    # Built under one jit: eager initialisation would compile every initialiser op separately.
    tok = nnx.jit(lambda: DeltaTok(DeltaTokConfig(hidden_size=48, num_layers=1, num_heads=3, intermediate_size=32),
                                   rngs=nnx.Rngs(0)))()
    tok_sd = {}
    for path, value in nnx.to_flat_state(nnx.state(tok, nnx.Param)):
        # Official names: an nnx.Linear's kernel [in, out] is torch's weight [out, in].
        names = [str(p) for p in path]
        array = np.asarray(value.get_value())
        if names[-1] == "kernel":
            names[-1], array = "weight", array.T
        tok_sd[".".join(names)] = np.ascontiguousarray(array)
    save_file(tok_sd, str(folder / "deltatok.safetensors"))
    world = nnx.jit(lambda: DeltaWorld(DeltaWorldConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                        backbone_hidden_size=48, rope_axis_sizes=(12,),
                                                        rope_unrotated_size=4), rngs=nnx.Rngs(1)))()
    save_file({k: np.ascontiguousarray(v) for k, v in world_state_dict(world).items()},
              str(folder / "deltaworld.safetensors"))
    # The same models as our trainer saves them (Orbax, item "params" = the pure dict of nnx.Params).
    import orbax.checkpoint as ocp

    for name, model in (("tok_run", tok), ("world_run", world)):
        manager = ocp.CheckpointManager(folder / name / "checkpoints",
                                        item_handlers={"params": ocp.StandardCheckpointHandler()})
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        manager.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        manager.wait_until_finished()
        manager.close()
    MODELS.update(tokenizer=tok, world=world)
    return {"vfm": "pixel", "tokenizer": str(folder / "deltatok.safetensors"),
            "world": str(folder / "deltaworld.safetensors")}


MODELS = {}


TINY = ["--patch_size=4", "--world_num_heads=2", "--world_rope_axis_sizes=12", "--world_rope_unrotated_size=4"]


def test_forecast_command_end_to_end(tmp_path, weights):
    from absl import flags

    video = _write_video(tmp_path / "clip.mp4")
    out = tmp_path / "out"
    argv = ["forecast", f"--video={video}", "--num_samples=2", "--horizon=3", "--context=4", "--stride=0.2",
            "--size=16", f"--vfm={weights['vfm']}", f"--tokenizer={weights['tokenizer']}",
            f"--world={weights['world']}", f"--out={out}", *TINY]
    was_parsed = flags.FLAGS.is_parsed()
    flags.FLAGS(argv)  # the absl command line, parsed in this process (a subprocess would recompile everything)
    try:
        forecast.main(["forecast"])
    finally:
        flags.FLAGS.unparse_flags()  # leave the global flags as other tests expect them
        if was_parsed:
            flags.FLAGS(["pytest"])
    with Image.open(out / "forecast.png") as im:
        assert im.format == "PNG"
        # rows: frames, best, mean, 2 samples, 16 px cells under a 28 px header of column titles (the full
        # 24x32 frame at short side 16, as two squares stitched back: 16x21 cells); 7 columns + the names
        k = forecast.upscale_factor(20)  # small cells are enlarged by whole pixels
        assert im.size[1] == forecast.HEADER_HEIGHT + 5 * 16 * k and im.size[0] > 7 * 20 * k
    with Image.open(out / "forecast.gif") as im:
        assert im.n_frames == 7
    with av.open(str(out / "forecast.mp4")) as c:
        assert len(list(c.decode(video=0))) == 7


def test_forecast_with_dinov3_and_rgb_head_without_future_frames(tmp_path, weights):
    """A tiny DINOv3 (saved by transformers) and an RGB head under the official names; the video holds only
    the context, so there is no truth row content and no best sample."""
    import torch
    from safetensors.numpy import save_file
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from deltaworld_jax.models.heads import RGBHead

    torch.manual_seed(0)
    dinov3_dir = tmp_path / "dinov3"
    DINOv3ViTModel(DINOv3ViTConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=3,
                                   patch_size=4, num_register_tokens=2)).save_pretrained(dinov3_dir)
    rgb = RGBHead(48, np.ones(48), np.zeros(48), hidden_size=16, depth=1, num_heads=2, mlp_size=16, patch_size=4,
                  img_size=16, rngs=nnx.Rngs(3))
    rgb_sd = {}
    for path, value in nnx.to_flat_state(nnx.state(rgb)):
        names, array = [str(p) for p in path], np.asarray(value.get_value())
        if names[0] in ("norm_weight", "norm_bias", "img_mean", "img_std"):
            continue  # buffers, not in the released checkpoint
        if names[-1] == "kernel":
            names[-1], array = "weight", array.T
        rgb_sd[".".join(names)] = np.ascontiguousarray(array)
    save_file(rgb_sd, str(tmp_path / "rgb.safetensors"))
    video = _write_video(tmp_path / "short.mp4", num_frames=8)  # 0.0-0.7 s: the 4 context frames only
    paths = forecast.run(video=video, out=str(tmp_path / "o"), num_samples=2, size=16, vfm=str(dinov3_dir),
                         tokenizer=weights["tokenizer"], world=weights["world"], world_num_heads=2,
                         world_rope_axis_sizes=(12,), rgb_head=str(tmp_path / "rgb.safetensors"), rgb_head_num_heads=2)
    with Image.open(paths["grid"]) as im:
        k = forecast.upscale_factor(20)  # the whole 24x32 frame at short side 16: 16x20 cells
        assert im.size[1] == forecast.HEADER_HEIGHT + 4 * 16 * k  # frames (context only), mean, 2 samples
        grid = np.asarray(im)
    assert grid[forecast.HEADER_HEIGHT + 16 * k:, -16 * k:].any()  # the last future frame of the mean row is drawn
    summary = json.loads(open(paths["summary_json"]).read())
    assert summary["scores"] is None and "no true future" in summary["note"]


def test_forecast_errors(tmp_path, weights):
    video = _write_video(tmp_path / "clip.mp4", num_frames=5)
    common = dict(out=str(tmp_path / "o"), size=16, patch_size=4, world_num_heads=2, world_rope_axis_sizes=(12,))
    with pytest.raises(forecast.ForecastInputError, match="weights not found"):
        forecast.run(video=video, vfm="pixel", tokenizer=str(tmp_path / "none.bin"), world=weights["world"], **common)
    with pytest.raises(forecast.ForecastInputError, match="too short"):
        forecast.run(video=video, **weights, **common)
    garbage = tmp_path / "bad.mp4"
    garbage.write_bytes(b"not a video at all" * 10)
    with pytest.raises(forecast.ForecastInputError, match="cannot read video"):
        forecast.run(video=str(garbage), **weights, **common)
    with pytest.raises(forecast.ForecastInputError, match="video not found"):
        forecast.run(video=str(tmp_path / "absent.mp4"), **weights, **common)
    with pytest.raises(forecast.ForecastInputError, match="not a positive multiple"):
        # checked before anything is read: the video does not even exist
        forecast.run(video=str(tmp_path / "absent.mp4"), **{**common, "size": 18}, **weights)
    with pytest.raises(forecast.ForecastInputError, match="--crop='square'"):
        forecast.run(video=video, **{**common, "crop": "square"}, **weights)


def _params(module):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def test_models_load_from_our_training_checkpoints(weights):
    folder = os.path.dirname(weights["world"])
    ours = forecast.load_models("pixel", os.path.join(folder, "tok_run"),
                                os.path.join(folder, "world_run", "checkpoints"), patch_size=4, world_num_heads=2,
                                world_rope_axis_sizes=(12,))
    for name in ("tokenizer", "world"):
        expected, got = _params(MODELS[name]), _params(ours[name])
        assert expected.keys() == got.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def test_world_model_adapters_in_the_protocol(weights):
    """DeltaWorld (N samples: best and mean) and DINO-World (deterministic) through evaluate()."""
    from deltaworld_jax.models.dinov3 import PixelPatchVFM
    from deltaworld_jax.models.dinoworld import DINOWorld, DINOWorldConfig
    from deltaworld_jax.evaluation import protocol as ev

    cfg = DINOWorldConfig(hidden_size=32, num_layers=1, num_heads=2, backbone_hidden_size=48,
                          rope_axis_sizes=(4, 4, 4), rope_unrotated_size=4, use_bom=False)
    dino = nnx.jit(lambda: DINOWorld(cfg, rngs=nnx.Rngs(2)))()
    rng = np.random.default_rng(0)
    batch = {"frames": rng.integers(0, 255, (1, 7, 16, 16, 3), dtype=np.uint8),
             "timestamps": np.arange(7, dtype=np.float32)[None] * 0.2}
    forecasters = [ev.DeltaWorldForecaster(MODELS["world"], MODELS["tokenizer"], num_samples=2),
                   ev.DINOWorldForecaster(dino)]
    results = ev.evaluate(forecasters, PixelPatchVFM(patch_size=4), {"synthetic": [batch]}, {},
                          ev.EvalSettings(horizons=(3,)))["synthetic"]
    assert set(results["deltaworld"]["c4_h3"]) == {"best", "mean"}
    assert set(results["dinoworld"]["c4_h3"]) == {"mean"}
    best, mean = results["deltaworld"]["c4_h3"]["best"], results["deltaworld"]["c4_h3"]["mean"]
    assert sorted(k for k in best if k != "loss") == ["t0", "t1", "t2"]
    assert np.isfinite(best["t2"]["loss"]) and np.isfinite(mean["t2"]["loss"])


def test_position_channels_reach_the_pixel_vfm(weights):
    """--position_channels builds the demo's VFM (width 48 + 16): a tokenizer trained on plain pixels (48) is
    refused with the width mismatch named, instead of failing inside the model."""
    assert forecast.load_models(weights["vfm"], weights["tokenizer"], weights["world"], patch_size=4, world_num_heads=2,
                                world_rope_axis_sizes=(12,), world_rope_unrotated_size=4)["vfm"].hidden_size == 48
    with pytest.raises(ValueError, match="hidden_size"):
        forecast.load_models(weights["vfm"], weights["tokenizer"], weights["world"], patch_size=4, position_channels=16,
                             world_num_heads=2, world_rope_axis_sizes=(12,), world_rope_unrotated_size=4)


def test_a_weights_folder_prefers_safetensors_which_needs_no_torch(tmp_path):
    from deltaworld_jax.forecast import inputs

    for name in ("pytorch_model.bin", "model.safetensors", "config.json"):
        (tmp_path / name).write_bytes(b"x")
    assert inputs._weights_in(str(tmp_path), "tokenizer") == str(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    assert inputs._weights_in(str(tmp_path), "tokenizer") == str(tmp_path / "pytorch_model.bin")
