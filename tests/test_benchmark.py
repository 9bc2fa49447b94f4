"""Benchmarks on tiny configs: analytic FLOPs vs the traced program vs XLA's cost analysis of the real
compiled train step, the step timer, and the analytic model at the released sizes."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from benchmarks import analysis
from deltaworld_jax import aot as program, flops as flops_lib
from deltaworld_jax.data.sampling import center_square
from configs import common

REPO = pathlib.Path(__file__).resolve().parents[1]

# ViT-B/16 DINOv3, DeltaTok (SwiGLU 2048, gate) and the predictor at the released sizes.
VITB = flops_lib.VFMDims(flops_lib.StackDims(768, 12, 12, 3072), patch_size=16, num_prefix=5)
DELTATOK = flops_lib.StackDims(768, 12, 12, 2048, gated_mlp=True, output_gate=True)
PREDICTOR = flops_lib.PredictorDims(768, 12, 12, 3072, 768, 768)


def tiny_deltatok_config(**model) -> ml_collections.ConfigDict:
    """DeltaTok on the pixel-patch VFM (8x8 patches -> width 192), 2 blocks per stack, 32x32 frames."""
    c = common.base_config()
    c.model.kind = "deltatok"
    c.model.dtype = "float32"
    c.model.num_layers = 2
    c.model.intermediate_size = 256
    c.model.update(model)
    c.vfm = ml_collections.ConfigDict(dict(kind="pixel", patch_size=8, num_heads=3, weights="", dtype="float32"))
    c.data = ml_collections.ConfigDict(dict(num_frames=2, frame_size=32))
    c.train.batch_size = 4
    c.optim.warmup_steps = 2
    return c


def test_vfm_frame_flops_by_hand():
    # One 512x512 frame: 1024 patches + 5 prefix tokens; per block 2*L*(4D^2 + 2DF) + 4 L^2 D.
    n, length, d, f = 1024, 1029, 768, 3072
    by_hand = 2 * n * 768 * d + 12 * (2 * length * (4 * d * d + 2 * d * f) + 4 * length * length * d)
    assert flops_lib.vfm_frame_forward(VITB, (512, 512)) == pytest.approx(by_hand, rel=1e-12)
    assert flops_lib.vfm_frame_forward(VITB, (512, 512)) == pytest.approx(215.04e9, rel=1e-3)


def test_released_forecast_matches_published_31_tflops():
    """Forecast-only accounting (VFM + tokens of the 4 context frames and the black frame, 20 samples x
    3 steps of predictor + decoder, two crops) reproduces the paper's ~31 TFLOPs; the official evaluation
    code additionally encodes the 3 target frames (+4.3 TFLOPs over two crops)."""
    only = flops_lib.deltaworld_forecast(VITB, DELTATOK, PREDICTOR, (512, 512), official_eval=False)
    full = flops_lib.deltaworld_forecast(VITB, DELTATOK, PREDICTOR, (512, 512), official_eval=True)
    assert 2 * flops_lib.total(only) == pytest.approx(analysis.PUBLISHED_FORECAST_FLOPS, rel=0.05)
    assert 2 * flops_lib.total(full) > 2 * flops_lib.total(only) + 4e12
    # The 60 decodes dominate; the predictor itself is ~0.1%.
    assert only["deltatok decode (per sample per step)"] / flops_lib.total(only) > 0.75
    assert only["predictor"] / flops_lib.total(only) < 2e-3


def test_deltaworld_predictor_is_far_cheaper_than_dinoworld():
    dw = flops_lib.deltaworld_forecast(VITB, DELTATOK, PREDICTOR, (512, 512), official_eval=False)["predictor"]
    dino = flops_lib.dinoworld_forecast(VITB, PREDICTOR, (512, 512), official_eval=False)["predictor"]
    assert dino / dw > 50  # 20 samples of 1 token vs 1 sample of 1024 tokens against 4-6k keys


def tiny_world_config(kind: str = "deltaworld") -> ml_collections.ConfigDict:
    """A world model (predictor width 128, 1 block, no remat) on the pixel VFM; DeltaWorld with K=16
    candidates in one pass and a randomly initialised 1-block DeltaTok."""
    c = tiny_deltatok_config()
    c.model = ml_collections.ConfigDict(dict(kind=kind, dtype="float32", hidden_size=128, num_layers=1, num_heads=4,
                                             rope_axis_sizes=(28,) if kind == "deltaworld" else (10, 10, 8),
                                             remat="none"))  # traced matmuls = the model's (no recompute)
    if kind == "deltaworld":
        c.model.update(dict(num_samples_train=16, bom_chunk=0))
        c.tokenizer = ml_collections.ConfigDict(dict(checkpoint="", allow_random=True, num_layers=1,
                                                     intermediate_size=256))
    c.data.num_frames = 4
    return c


@pytest.mark.parametrize("kind", ["deltaworld", "dinoworld"])
def test_world_model_flops_agree_on_real_step_and_forecast(kind):
    report = analysis.flops_report(tiny_world_config(kind), xla=True, xla_batch=4 if kind == "deltaworld" else 2)
    for check in (report["xla_check"], report["xla_forecast_check"]):
        assert check["jaxpr_matmul"] == pytest.approx(check["analytic"], rel=1e-6)
        assert check["xla_vs_analytic"] < 0.10, check
    # The trained module is the predictor (+ DINO-World's learned query, hidden_size values).
    extra = report["params"]["trained (total)"] - report["params"]["predictor"]
    assert extra == (0 if kind == "deltaworld" else 128)
    if kind == "deltaworld":
        assert report["params"]["deltatok decoder"] > 0
        assert "predictor best-of-K search (fwd)" in report["train_per_example"]


def test_dinov3_vfm_flops_agree_with_xla():
    from deltaworld_jax.training import mfu as model_info
    from deltaworld_jax.pretrained import build_vfm

    # One block: XLA's cost analysis counts a while-loop body once, and stacks stored stacked run as one
    # scan (models/block_stack.run_blocks), so a one-block program is checked against XLA's count.
    vfm = nnx.eval_shape(lambda: build_vfm(dict(kind="dinov3", preset="vits16", weights="",
                                                overrides={"num_layers": 1})))
    graphdef, state = nnx.split(vfm)
    frames = jax.ShapeDtypeStruct((1, 2, 64, 64, 3), jnp.uint8)
    fn = lambda state, frames: nnx.merge(graphdef, state)(frames)  # noqa: E731
    xla, _ = flops_lib.xla_flops(jax.jit(fn).lower(state, frames).compile())
    traced, _ = flops_lib.jaxpr_matmul_flops(fn, state, frames)
    analytic = 2 * flops_lib.vfm_frame_forward(model_info.vfm_dims(vfm), (64, 64))
    assert traced == pytest.approx(analytic, rel=1e-6)
    assert flops_lib.relative_difference(xla, analytic) < 0.10


@pytest.fixture(scope="module")
def tiny_report():
    # One block per stack, so XLA's count (a while-loop body once) sees every block (see above); no remat,
    # so the traced matmuls are the model's own (the default policy recomputes attention's matmuls).
    return analysis.flops_report(tiny_deltatok_config(num_layers=1, remat="none"), xla=True, xla_batch=8)


def test_flops_agree_analytic_traced_xla_on_real_step(tiny_report):
    check = tiny_report["xla_check"]
    # The traced program's matmuls are exactly the analytic count (same formula, independent route).
    assert check["jaxpr_matmul"] == pytest.approx(check["analytic"], rel=1e-6)
    # XLA counts every op of the compiled step (elementwise, optimiser too): within 10%.
    assert check["xla_vs_analytic"] < 0.10, check
    assert check["xla"] > check["analytic"]


def test_parameter_counts_per_component(tiny_report):
    params = tiny_report["params"]
    assert params["vfm"] == 0  # the pixel VFM has no parameters
    assert params["deltatok encoder"] + params["deltatok decoder"] == params["trained (total)"]
    # Encoder = decoder blocks + z/xy embeddings (3 x 192) + the token LayerNorm (2 x 192).
    assert params["deltatok encoder"] - params["deltatok decoder"] == 3 * 192 + 2 * 192
    assert "deltatok encode (fwd+bwd)" in tiny_report["train_per_example"]


def test_step_timer_on_tiny_deltatok():
    from benchmarks import step

    config = tiny_deltatok_config(remat="full", num_layers=1)
    result = step.time_step(config, warmup=1, steps=2)
    assert result["step_seconds_median"] > 0 and result["compile_seconds"] > 0
    assert result["examples_per_second"] == pytest.approx(4 / result["step_seconds_median"])
    assert result["mfu"] is None  # CPU: FLOP/s only
    assert result["memory"]["arguments"] > 0 and np.isfinite(result["final_loss"])
    assert result["remat"] == "full"


def test_peak_table():
    from benchmarks import step

    class Dev:
        platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"

    assert step.peak_flops(Dev()) == 989e12
    Dev.platform, Dev.device_kind = "tpu", "TPU v5 lite"
    assert step.peak_flops(Dev()) == 197e12
    Dev.platform, Dev.device_kind = "cpu", "cpu"
    assert step.peak_flops(Dev()) is None


def test_trainer_mfu_meter_uses_the_analytic_flops_and_the_peak_table():
    from deltaworld_jax.training import mfu as training_mfu, trainer

    config = tiny_deltatok_config()
    setup = trainer.build(program.benchmark_config(config), analysis.single_device_mesh(), abstract_frozen=True)
    trainable, frozen = setup.abstract_module, trainer.frozen_modules(setup)
    expected = flops_lib.total(analysis.train_step_flops(analysis.model_dims(setup, config), (32, 32), 4, 2,
                                                         official=False))
    assert training_mfu.analytic_step_flops(config, trainable, frozen) == pytest.approx(expected)

    class Dev:
        platform, device_kind = "tpu", "TPU v5 lite"

    class Mesh:
        devices = np.array([Dev()] * 4)

    meter = training_mfu.MFUMeter.for_training(config, Mesh, trainable, frozen)
    logged = meter(2.0)
    assert logged["model_tflops_per_second"] == pytest.approx(2 * expected / 1e12)
    assert logged["mfu"] == pytest.approx(2 * expected / (4 * 197e12))
    Dev.platform = "cpu"  # unknown peak: model FLOP/s only
    assert set(training_mfu.MFUMeter.for_training(config, Mesh, trainable, frozen)(2.0)) \
        == {"model_tflops_per_second"}
    bad = tiny_world_config("deltaworld")
    bad.model.use_bom = False  # no analytic count for the learned-query DeltaWorld: no MFU, no error
    assert training_mfu.MFUMeter.for_training(bad, Mesh, None, None)(2.0) == {}


# ----------------------------------------------------------------------------------------------------
# Precomputed tokens
# ----------------------------------------------------------------------------------------------------


def tiny_token_config(tmp_path) -> ml_collections.ConfigDict:
    from deltaworld_jax.data.config import default_data_config

    c = tiny_deltatok_config()
    c.data = default_data_config()
    c.data.source = "synthetic"
    c.data.num_frames = 4
    c.data.frame_size = 32
    c.data.synthetic.num_clips = 2
    c.data.synthetic.duration = 1.2
    c.data.synthetic.fps = 10.0
    c.data.synthetic.height = c.data.synthetic.width = 40
    c.data.token_cache = str(tmp_path / "tokens")
    return c


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    from deltaworld_jax.data import token_cache as tokens
    from deltaworld_jax.models.deltatok import DeltaTok, DeltaTokConfig
    from deltaworld_jax.models.dinov3 import PixelPatchVFM

    tmp = tmp_path_factory.mktemp("tokens")
    config = tiny_token_config(tmp)
    vfm = PixelPatchVFM(patch_size=8, num_heads=3)
    tok = DeltaTok(DeltaTokConfig(hidden_size=192, num_layers=1, num_heads=3, intermediate_size=128,
                                  layer_scale_init=0.5), rngs=nnx.Rngs(3))
    summary = tokens.write_token_cache(config, config.data.token_cache, vfm, tok)
    return config, vfm, tok, summary


def test_index_gap_covers_every_sampled_clip():
    from deltaworld_jax.data import token_cache as tokens
    from deltaworld_jax.data.sampling import clip_rng, sample_train_frame_indices

    times = np.arange(250) / 25.0
    gap = tokens.max_index_gap(times, (1 / 25, 1 / 3))
    assert gap == 10
    seen = 0
    for i in range(300):
        indices, _ = sample_train_frame_indices(times, 8, (1 / 25, 1 / 3), clip_rng(0, i))
        seen = max(seen, int(np.diff(indices).max()))
        assert np.diff(indices).min() >= 0
    assert seen <= gap


def test_cached_tokens_equal_tokenizing_the_sampled_frames(token_cache):
    from deltaworld_jax.data import token_cache as tokens
    from deltaworld_jax.data import pipeline
    from deltaworld_jax.data.sampling import clip_rng

    config, vfm, tok, summary = token_cache
    assert summary["num_videos"] == 2 and summary["frames"] == 24
    cache = tokens.TokenCache(config.data.token_cache)
    source = pipeline.make_train_source(config.data)
    transform = functools.partial(center_square, size=32)
    for video in range(2):
        clip = cache.load_clip(video, 4, config.data.time_stride_range, clip_rng(5, video))
        frames = np.stack(source.read_frames(video, clip["frame_indices"], transform))[None]
        expected = nnx.jit(lambda tok, frames: tok.tokenize_clip(
            vfm(frames), vfm(jnp.zeros((1, 32, 32, 3), jnp.uint8)), tok.rope((4, 4)))[0])(tok, jnp.asarray(frames))
        np.testing.assert_allclose(clip["tokens"], np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_token_iterator_is_deterministic_and_resumable(token_cache):
    from deltaworld_jax.data import token_cache as tokens

    config, *_ = token_cache
    config.train.batch_size = 3
    first = tokens.token_data_fn(config, process_index=0, process_count=1)
    batches = [next(first) for _ in range(3)]
    assert batches[0]["tokens"].shape == (3, 4, 192) and batches[0]["timestamps"].shape == (3, 4)
    resumed = tokens.token_data_fn(config, process_index=0, process_count=1)
    resumed.set_state({"position": 2})
    np.testing.assert_array_equal(next(resumed)["tokens"], batches[2]["tokens"])
    # Global batch k is the same for any process count: 2 processes' batches side by side; a resume at a
    # global step (a checkpoint of another process count) continues there.
    config.train.batch_size = 4
    single = tokens.token_data_fn(config, process_index=0, process_count=1)
    one = [next(single) for _ in range(2)]
    halves = [tokens.token_data_fn(config, process_index=p, process_count=2) for p in range(2)]
    for k in range(2):
        parts = [next(h) for h in halves]
        np.testing.assert_array_equal(np.concatenate([p["tokens"] for p in parts]), one[k]["tokens"])
    moved = tokens.token_data_fn(config, process_index=1, process_count=2)
    moved.set_state(moved.global_state(1))
    np.testing.assert_array_equal(next(moved)["tokens"], one[1]["tokens"][2:])


def test_training_from_cached_tokens_gives_the_frames_loss(token_cache):
    """The world task's loss on a batch of cached tokens equals its loss on the same clips' frames."""
    from deltaworld_jax.data import token_cache as tokens
    from deltaworld_jax.data import pipeline
    from deltaworld_jax.data.sampling import clip_rng
    from deltaworld_jax import tasks

    config, vfm, tok, _ = token_cache
    world_cfg = tiny_world_config()
    world_cfg.data = config.data
    task = tasks.make_task(world_cfg)
    model = task.build_trainable(nnx.Rngs(0))
    frozen = {"vfm": vfm, "tokenizer": tok}
    cache = tokens.TokenCache(config.data.token_cache)
    source = pipeline.make_train_source(config.data)
    transform = functools.partial(center_square, size=32)
    clips = [cache.load_clip(v, 4, config.data.time_stride_range, clip_rng(9, v)) for v in (0, 1)]
    frames = np.stack([np.stack(source.read_frames(v, c["frame_indices"], transform)) for v, c in zip((0, 1), clips)])
    times = np.stack([c["timestamps"] for c in clips])
    rng = jax.random.PRNGKey(4)
    loss = nnx.jit(lambda model, frozen, batch: task.loss(model, frozen, batch, rng)[0])
    from_frames = loss(model, frozen, {"frames": jnp.asarray(frames), "timestamps": jnp.asarray(times)})
    from_tokens = loss(model, frozen, {"tokens": jnp.asarray(np.stack([c["tokens"] for c in clips])),
                                       "timestamps": jnp.asarray(times)})
    assert float(from_tokens) == pytest.approx(float(from_frames), rel=1e-5, abs=1e-7)


def test_trainer_reads_the_token_cache_when_the_config_names_one(token_cache, tmp_path):
    from deltaworld_jax.data import token_cache as tokens
    from deltaworld_jax.training import trainer

    config, *_ = token_cache
    world = tiny_world_config()
    world.data = config.data
    world.train.batch_size = 2
    data_iter = trainer.default_data_fn(world, process_index=0, process_count=1)
    assert isinstance(data_iter, tokens.TokenIterator)
    assert next(data_iter)["tokens"].shape == (2, 4, 192)
    # The trainer's checkpoints store the iterator with Grain's Orbax handler: it must round-trip there.
    import grain
    from etils import epath

    expected = next(data_iter)["tokens"]
    handler = grain.checkpoint.CheckpointHandler()
    (tmp_path / "it").mkdir()
    data_iter.position -= 1
    handler.save(epath.Path(tmp_path / "it"), item=data_iter)
    restored = handler.restore(epath.Path(tmp_path / "it"),
                               item=trainer.default_data_fn(world, process_index=0, process_count=1))
    np.testing.assert_array_equal(next(restored)["tokens"], expected)

    config.model.kind = "deltatok"  # the tokenizer itself cannot train from its own tokens
    with pytest.raises(ValueError, match="only DeltaWorld trains from precomputed delta tokens"):
        trainer.default_data_fn(config, process_index=0, process_count=1)
    wider = world.copy_and_resolve_references()
    wider.data.time_stride_range = (0.1, 0.9)  # beyond the strides the cache was written for
    with pytest.raises(ValueError, match="reaches beyond them"):
        trainer.default_data_fn(wider, process_index=0, process_count=1)
    missing = world.copy_and_resolve_references()
    missing.data.token_cache = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no token cache at"):
        trainer.default_data_fn(missing, process_index=0, process_count=1)


def test_video_tokenizer_chunks_and_padding_do_not_change_the_results(token_cache):
    """Calls of at most `chunk` items padded to a power of two (10 frames with chunk 4: 4 + 4 + 2) give
    what one unpadded call gives."""
    from deltaworld_jax.data import token_cache as tokens

    _, vfm, tok, _ = token_cache
    frames = np.random.default_rng(0).integers(0, 255, (10, 32, 32, 3), dtype=np.uint8)
    chunked = tokens.VideoTokenizer(vfm, tok, (32, 32), chunk=4)
    whole = np.asarray(vfm(jnp.asarray(frames)))
    np.testing.assert_allclose(np.asarray(chunked.features(frames)), whole, rtol=1e-6, atol=1e-6)
    expected = np.asarray(tok.encode(jnp.asarray(whole[:-1]), jnp.asarray(whole[1:]), tok.rope((4, 4)))[:, 0])
    got = chunked.encode(jnp.asarray(whole[:-1]), jnp.asarray(whole[1:]))  # 9 pairs: 4 + 4 + 1 (padded to 1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_video_tokenizer_tokenises_a_group_of_videos_as_each_alone(token_cache):
    """write_token_cache sends videos through the VFM and encoder in groups: each video's tokens are what it
    gets alone, whatever its length and pair offsets."""
    from deltaworld_jax.data import token_cache as tokens

    _, vfm, tok, _ = token_cache
    rng = np.random.default_rng(1)
    videos = [rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8) for n in (5, 3, 7)]
    offsets = [np.arange(3), np.arange(2), np.arange(4)]
    worker = tokens.VideoTokenizer(vfm, tok, (32, 32))
    grouped = worker.videos_tokens(videos, offsets)
    for frames, offs, (black, pairs) in zip(videos, offsets, grouped):
        alone_black, alone_pairs = tokens.VideoTokenizer(vfm, tok, (32, 32)).video_tokens(frames, offs)
        assert black.shape == alone_black.shape and pairs.shape == alone_pairs.shape == (len(frames), len(offs), 192)
        np.testing.assert_allclose(black, alone_black, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(pairs, alone_pairs, rtol=1e-5, atol=1e-5)
        assert not pairs[len(frames) - 1, 1:].any()  # past the last frame: zero


def test_demo_tokenizer_script_measures_own_other_and_copy():
    """benchmarks/demo_tokenizer.py (the measurement behind the demo's VFM and world) runs end to end."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_tokenizer", REPO / "benchmarks" / "demo_tokenizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.run(script.parse_args(["--steps=2", "--train_pairs=8", "--test_pairs=4", "--batch=4", "--every=1"]))
    assert set(result) == {"own", "other", "copy", "token_spread"} and all(np.isfinite(v) for v in result.values())
    assert result["copy"] > 0
