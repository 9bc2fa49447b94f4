"""`python -m deltaworld_jax.pretrained.convert`: official .bin / .ckpt -> safetensors under the official names,
loaded by the loaders in a process where `import torch` fails, to the very same parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from deltaworld_jax.pretrained import common, load_deltatok, load_deltaworld

torch = pytest.importorskip("torch")
from test_pretrained_deltatok import official_tree  # noqa: E402  (needs torch + transformers)
from test_pretrained_world import _World  # noqa: E402

REPO = Path(__file__).parents[1]

# Run in a fresh interpreter where torch cannot be imported (as on a TPU VM without it): loads each
# checkpoint with its loader and saves the parameters, or the error, for the test to compare.
TORCH_FREE_LOAD = """
import json, sys
sys.modules["torch"] = None  # `import torch` now raises ImportError
import numpy as np
from flax import nnx
from deltaworld_jax import pretrained
from deltaworld_jax.pretrained import common
out, jobs = sys.argv[1], json.loads(sys.argv[2])
report = {}
for name, (loader, path, kwargs) in jobs.items():
    try:
        model = getattr(pretrained, loader)(path, **kwargs)
    except ImportError as error:
        report[name] = "ImportError: " + str(error)
        continue
    flat = {common.path_to_str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    np.savez(f"{out}/{name}.npz", **flat)
    report[name] = "loaded"
report["torch_imported"] = sys.modules.get("torch") is not None
json.dump(report, open(f"{out}/report.json", "w"))
"""


def params(model) -> dict[str, np.ndarray]:
    return {common.path_to_str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
                            **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_converted_weights_load_without_torch_to_identical_parameters(tmp_path):
    tok_sd = official_tree().state_dict()
    torch.save(tok_sd, tmp_path / "pytorch_model.bin")
    world = _World()  # the released DeltaWorld's trained parameters, official names
    torch.save({"state_dict": {f"network.{k}": v for k, v in world.state_dict().items()}, "global_step": 7},
               tmp_path / "world.ckpt")

    printed = run(["-m", "deltaworld_jax.pretrained.convert", f"--input={tmp_path / 'pytorch_model.bin'}",
                   f"--output={tmp_path / 'deltatok.safetensors'}"]).stdout
    assert "deltatok.safetensors" in printed
    run(["-m", "deltaworld_jax.pretrained.convert", f"--input={tmp_path / 'world.ckpt'}",
         f"--output={tmp_path / 'world_folder'}"])
    assert (tmp_path / "world_folder" / "model.safetensors").exists()
    # Official names kept (the loaders' name maps do the renaming), Lightning prefix included.
    converted = common.read_state_dict(tmp_path / "world_folder" / "model.safetensors")
    assert sorted(converted) == sorted(f"network.{k}" for k in world.state_dict())

    world_kwargs = dict(num_heads=2, rope_axis_sizes=[12])
    jobs = {"tok": ("load_deltatok", str(tmp_path / "deltatok.safetensors"), {}),
            "world": ("load_deltaworld", str(tmp_path / "world_folder" / "model.safetensors"), world_kwargs),
            "bin_without_torch": ("load_deltatok", str(tmp_path / "pytorch_model.bin"), {})}
    run(["-c", TORCH_FREE_LOAD, str(tmp_path), json.dumps(jobs)])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tok"] == report["world"] == "loaded" and report["torch_imported"] is False
    # A .bin without torch: the error says exactly what to do.
    assert 'pip install -e ".[torch]"' in report["bin_without_torch"]
    assert "python -m deltaworld_jax.pretrained.convert --input=" in report["bin_without_torch"]

    for name, reference in (("tok", load_deltatok(tmp_path / "pytorch_model.bin")),
                            ("world", load_deltaworld(tmp_path / "world.ckpt", num_heads=2, rope_axis_sizes=(12,)))):
        expected = params(reference)
        with np.load(tmp_path / f"{name}.npz") as loaded:
            assert sorted(loaded.files) == sorted(expected)
            for key, value in expected.items():
                np.testing.assert_array_equal(loaded[key], value, err_msg=f"{name}: {key}")
                assert loaded[key].dtype == value.dtype


def test_bfloat16_weights_are_widened_exactly_and_read_without_torch(tmp_path):
    sd = {k: v.to(torch.bfloat16) for k, v in official_tree().state_dict().items()}
    torch.save(sd, tmp_path / "bf16.bin")
    from deltaworld_jax.pretrained.convert import convert

    target = convert(tmp_path / "bf16.bin", tmp_path / "bf16.safetensors")
    converted = common.read_state_dict(target)
    for key, value in sd.items():
        assert converted[key].dtype == np.float32
        np.testing.assert_array_equal(converted[key], value.float().numpy(), err_msg=key)
    # A bfloat16 safetensors file (as some hubs publish) is read through JAX, not torch.
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "hub_bf16.safetensors"))
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\nfrom deltaworld_jax.pretrained import common\n"
            f"sd = common.read_state_dict({str(tmp_path / 'hub_bf16.safetensors')!r})\n"
            f"np.savez({str(tmp_path / 'read.npz')!r}, **sd)\n")
    run(["-c", code])
    with np.load(tmp_path / "read.npz") as read:
        for key, value in sd.items():
            np.testing.assert_array_equal(read[key], value.float().numpy(), err_msg=key)


def test_hugging_face_folder_keeps_its_config(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save({"a.weight": torch.ones(2, 3)}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text('{"hidden_size": 3}')
    from deltaworld_jax.pretrained.convert import convert

    convert(folder, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"hidden_size": 3}
    np.testing.assert_array_equal(common.read_state_dict(tmp_path / "out")["a.weight"], np.ones((2, 3)))
    with pytest.raises(ValueError, match="no tensors"):
        torch.save({"step": 3}, tmp_path / "empty.ckpt")
        convert(tmp_path / "empty.ckpt", tmp_path / "empty.safetensors")
