"""The Colab notebooks run top to bottom (on tiny settings: DELTAWORLD_COLAB_TINY=1), so they cannot rot.

The released-weights notebook reads tiny RANDOM models written here in the released formats (a transformers
DINOv3 folder; DeltaTok, DeltaWorld and head `pytorch_model.bin` files under the official names), laid out
like the hub (<repo id>/<file>) and handed over through DELTAWORLD_COLAB_WEIGHTS instead of a download."""

from __future__ import annotations

import json
import os
import pathlib

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from conftest import DEMO_RECIPE_PROGRAMS, JIT_CACHE_ENV, repo_pythonpath

REPO = pathlib.Path(__file__).resolve().parents[1]
COLABS = REPO / "colabs"
WIDTH = 32  # feature width of every tiny model


def _execute(name: str, tmp_path: pathlib.Path, env: dict[str, str]) -> nbformat.NotebookNode:
    notebook = nbformat.read(COLABS / name, as_version=4)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook


def _base_env() -> dict[str, str]:
    # The tests' compilation cache: the quickstart's training compiles the demo recipe's programs, which
    # test_demo.py's runs load instead of compiling again when they come later (and the other way round).
    return {**JIT_CACHE_ENV, "DELTAWORLD_COLAB_TINY": "1", "PYTHONPATH": repo_pythonpath(), "JAX_PLATFORMS": "cpu",
            "DELTAWORLD_REPO_DIR": str(REPO)}


def _outputs(notebook, kind: str) -> list:
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
            if o.get("output_type") == kind or (kind == "display" and o.get("output_type") in
                                               ("display_data", "execute_result"))]


def _text(notebook) -> str:
    return "".join(o["text"] for o in _outputs(notebook, "stream"))


@pytest.mark.parametrize("name", ["quickstart.ipynb", "forecast_with_released_weights.ipynb"])
def test_notebook_has_badge_parameters_and_no_stored_outputs(name):
    notebook = nbformat.read(COLABS / name, as_version=4)
    badge = f"https://colab.research.google.com/github/YOUR_GITHUB_ORG/deltaworld_jax/blob/main/colabs/{name}"
    assert badge in notebook.cells[0].source
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "DELTAWORLD_COLAB_TINY" in tagged[0].source
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code")


def _save_torch(state: dict[str, np.ndarray], path: pathlib.Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, path)


@pytest.fixture(scope="module")
def tiny_released_weights(tmp_path_factory) -> pathlib.Path:
    """Tiny random models in the released formats, laid out like the hub."""
    import torch
    from flax import nnx
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from deltaworld_jax.models.deltatok import DeltaTok, DeltaTokConfig
    from deltaworld_jax.models.deltaworld import DeltaWorld, DeltaWorldConfig
    from deltaworld_jax.pretrained.world import world_state_dict

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    dinov3 = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1,
                                            num_attention_heads=2, patch_size=16, num_register_tokens=4)).eval()
    dinov3.save_pretrained(root / "facebook" / "dinov3-vitb16-pretrain-lvd1689m")

    # Built under one jit: eager initialisation would compile every initialiser op on its own.
    tokenizer = nnx.jit(lambda: DeltaTok(DeltaTokConfig(hidden_size=WIDTH, num_layers=1, num_heads=2,
                                                        intermediate_size=2 * WIDTH), rngs=nnx.Rngs(0)))()
    state = {}
    for path, value in nnx.to_flat_state(nnx.state(tokenizer, nnx.Param)):
        # Official names are our paths, except that an nnx.Linear's kernel [in, out] is torch's weight [out, in].
        names, array = [str(p) for p in path], np.asarray(value.get_value())
        if names[-1] == "kernel":
            names[-1], array = "weight", array.T
        state[".".join(names)] = array
    _save_torch(state, root / "Amazon-FAR" / "deltatok-kinetics" / "pytorch_model.bin")

    # num_heads / rope_axis_sizes match the notebook's tiny WORLD_KWARGS.
    world = nnx.jit(lambda: DeltaWorld(DeltaWorldConfig(hidden_size=WIDTH, num_layers=1, num_heads=2,
                                                        backbone_hidden_size=WIDTH, rope_axis_sizes=(12,)),
                                       rngs=nnx.Rngs(1)))()
    _save_torch(world_state_dict(world), root / "Amazon-FAR" / "deltaworld-kinetics" / "pytorch_model.bin")

    rng = np.random.default_rng(0)
    for repo, outputs in (("seg-head-vspw", 124), ("depth-head-kitti", 256)):
        head = {"bn.weight": 1 + 0.1 * rng.standard_normal(WIDTH), "bn.bias": 0.1 * rng.standard_normal(WIDTH),
                "bn.running_mean": rng.standard_normal(WIDTH), "bn.running_var": 1 + rng.random(WIDTH),
                "head.weight": rng.standard_normal((outputs, WIDTH, 1, 1)), "head.bias": rng.standard_normal(outputs)}
        head = {k: v.astype(np.float32) for k, v in head.items()}
        head["bn.num_batches_tracked"] = np.array(0, np.int64)
        _save_torch(head, root / "Amazon-FAR" / repo / "pytorch_model.bin")
    return root


def test_forecast_with_released_weights_runs(tiny_released_weights, tmp_path):
    # The real camera clip of tests/data (640x272, first frame stamped 3.04 s), its whole frame at short side 64.
    notebook = _execute("forecast_with_released_weights.ipynb", tmp_path,
                        {**_base_env(), "DELTAWORLD_COLAB_WEIGHTS": str(tiny_released_weights),
                         "DELTAWORLD_COLAB_VIDEO": str(REPO / "tests" / "data" / "bikes_cyclist.mp4")})
    text = _text(notebook)
    assert not _outputs(notebook, "error")
    assert "frames at [0.  0.2 0.4 0.6 0.8 1.  1.2] s after its first frame" in text, text
    # Shapes of the tiny run: 64x144 frames at patch 16 -> 4x9 = 36 patches; 4 context + 3 future frames, 4 samples.
    assert "futures (4, 3, 36, 32)" in text, text
    assert "(1, 4, 32) delta tokens (one per frame)" in text, text
    displays = _outputs(notebook, "display")
    images = [o for o in displays if "image/png" in o["data"].get("text/html", "")]
    assert len(images) == 4  # the clip; segmentation, depth and feature-PCA grids of the futures
    assert any("image/gif" in o["data"] for o in displays)  # the animation


@DEMO_RECIPE_PROGRAMS  # on the worker that runs test_demo.py's demo recipe (the same programs)
def test_quickstart_runs(tmp_path):
    """The demo recipe at its "quick" setting (2 steps a stage) through the trainer, then the token and
    forecast cells on the trained modules."""
    notebook = _execute("quickstart.ipynb", tmp_path, _base_env())
    assert not _outputs(notebook, "error")
    summary = json.loads(_text(notebook).split("SUMMARY ", 1)[1].splitlines()[0])
    # configs/demo.py: 32x32 frames in 4x4 patches -> 64 patches of 3*4*4 = 48 pixel values + 16 position
    # channels; one token (of the VFM's width, 64) each frame.
    assert summary["tokens_per_frame"] == 1 and summary["token_width"] == 64 and summary["patches_per_frame"] == 64
    assert all(np.isfinite(summary[f"{kind}_{which}_loss"]) for kind in ("deltatok", "deltaworld")
               for which in ("first", "final"))
    displays = _outputs(notebook, "display")
    assert any("best vs mean" in o["data"].get("text/markdown", "") for o in displays)  # demo table
    assert sum("image/png" in o["data"].get("text/html", "") for o in displays) >= 4
