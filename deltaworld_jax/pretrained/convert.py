r"""Converts released PyTorch weights to safetensors once, so machines that load them never install torch.

  # On a workstation with torch (pip install -e ".[torch]"):
  python -m deltaworld_jax.pretrained.convert --input=deltatok-kinetics/pytorch_model.bin \
      --output=deltatok-kinetics.safetensors
  python -m deltaworld_jax.pretrained.convert --input=last.ckpt --output=/weights/deltatok   # -> .../model.safetensors
  # On the TPU VM / GPU node (no torch): every loader takes the result as it takes the .bin.
  tok = pretrained.load_deltatok("deltatok-kinetics.safetensors", vfm=vfm)

What is written is the checkpoint's own state dict, under the OFFICIAL names (a Lightning `.ckpt` keeps its
`state_dict` keys, `network.` prefix included): the loaders' name maps stay the one place that renames, and
the result is what the official code would read too. Tensors are stored as they are, except bfloat16, which
is widened to float32 exactly (numpy has no bfloat16). Non-tensor entries (optimizer state, step counters) are
left out. An output folder gets `model.safetensors` (+ the input folder's `config.json`), the layout a
Hugging Face folder has, so `load_dinov3(folder)` reads it too.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
from absl import app, flags

from deltaworld_jax.pretrained import common

SAFETENSORS_NAME = "model.safetensors"


def output_file(output: str) -> str:
    """The .safetensors file `output` names: itself, or <output folder>/model.safetensors."""
    return output if output.endswith(".safetensors") else os.path.join(output, SAFETENSORS_NAME)


def convert(input_path: str | os.PathLike, output: str | os.PathLike) -> str:
    """Writes the state dict of `input_path` (a .bin/.pth/.pt/.ckpt file or a Hugging Face folder) as
    safetensors at `output` (a .safetensors file, or a folder); returns the file written."""
    from safetensors.numpy import save_file

    input_path, output = os.fspath(input_path), os.fspath(output)
    state = common.read_state_dict(input_path)
    if not state:
        raise ValueError(f"{input_path} holds no tensors to convert")
    target = output_file(output)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    tensors = {key: np.ascontiguousarray(value) for key, value in state.items()}
    save_file(tensors, target, metadata={"format": "pt", "converted_from": os.path.basename(input_path.rstrip("/")),
                                         "converter": "deltaworld_jax.pretrained.convert"})
    config = os.path.join(input_path, "config.json")
    if os.path.isdir(input_path) and os.path.isfile(config) and not output.endswith(".safetensors"):
        shutil.copyfile(config, os.path.join(os.path.dirname(target), "config.json"))
    return target


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.input or not f.output:
        raise app.UsageError("--input and --output are required")
    target = convert(f.input, f.output)
    print(f"wrote {target}")


if __name__ == "__main__":
    flags.DEFINE_string("input", None, "pytorch_model.bin / .pth / .pt / Lightning .ckpt, or a Hugging Face folder.")
    flags.DEFINE_string("output", None, "A .safetensors file, or a folder (gets model.safetensors).")
    app.run(main)
