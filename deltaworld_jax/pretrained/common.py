"""Strict checkpoint loading shared by every importer of official weights.

The flow of a loader:
  1. `read_state_dict(path)` -> flat {checkpoint key: numpy array} from .bin/.pth/.pt, Lightning .ckpt,
     .safetensors or a Hugging Face folder (single or sharded safetensors, or pytorch_model.bin);
  2. `map_weights(state, TABLE)`: the family's weight map, ONE table of `Rule`s (official key template ->
     our parameter path template, and the layout change: a torch Linear / Conv weight becomes our
     transposed `kernel`), gives {our parameter path ("layer.0.attention.q_proj.kernel"): array}, each entry
     remembering its source key; keys no rule matches are kept as unmapped (reported by the fill);
  3. `fill_abstract_model(nnx.eval_shape(build), params)`: casts to each parameter's dtype, checks shapes, and
     raises ONE `CheckpointMismatchError` listing every unused checkpoint entry, every missing parameter and
     every shape mismatch. Building abstractly means the model's weights are only ever allocated once.

Both layouts of a block stack (models/block_stack.make_blocks) load through the same tables: the tables name the
per-layer paths (`encoder_blocks.{i}.mlp.up_proj.kernel`); when the model stores a stack stacked
(`encoder_blocks.stacked.mlp.up_proj.kernel`, [L, ...]) the fill stacks layer i's array at index i
(`stack_layers`), and `unmap_weights` splits a stacked array back into per-layer entries (`unstack_layers`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import re
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltaworld_jax.models.block_stack import STACKED

StateDict = dict[str, np.ndarray]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: lists all unused, missing and mis-shaped entries at once."""


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def _import_torch(path: str = "<checkpoint>"):
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading the PyTorch checkpoint {path} needs `torch`, which is not installed. Either install it "
            '(pip install -e ".[torch]"), or convert the checkpoint once on a machine that has torch: '
            f"python -m deltaworld_jax.pretrained.convert --input={path} --output=<name>.safetensors "
            "and load the .safetensors file here (safetensors need no torch).") from e
    return torch


def _torch_to_numpy(value: Any) -> np.ndarray:
    torch = _import_torch()
    t = value.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
        t = t.float()
    return t.numpy()


def _flatten_torch_state(obj: Mapping[str, Any], prefix: str = "") -> StateDict:
    """Nested dicts of tensors -> flat {dotted key: numpy array}; non-tensor entries are skipped."""
    torch = _import_torch()
    out: StateDict = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = _torch_to_numpy(value)
        elif isinstance(value, Mapping):
            out.update(_flatten_torch_state(value, name + "."))
    return out


def _read_torch_file(path: str) -> StateDict:
    torch = _import_torch(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, ...)
        raise ValueError(f"could not read PyTorch checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    # Lightning checkpoints keep the weights under "state_dict"; some exporters use "model"/"module".
    for wrapper in ("state_dict", "model", "module"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    return _flatten_torch_state(obj)


def _read_safetensors(path: str) -> StateDict:
    from safetensors import safe_open

    out: StateDict = {}
    try:
        # framework="np" cannot read bfloat16 (it raises, or returns raw 2-byte voids); JAX can, with no
        # torch, and the values are widened exactly to float32.
        with safe_open(path, framework="np") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
        unreadable = [key for key, value in out.items() if value.dtype.kind == "V"]
    except (TypeError, ValueError) as e:
        if "bf16" not in str(e).lower() and "bfloat16" not in str(e).lower():
            raise
        unreadable = None  # every tensor
    if unreadable is None or unreadable:
        with safe_open(path, framework="flax") as f:
            for key in (f.keys() if unreadable is None else unreadable):
                value = f.get_tensor(key)
                out[key] = np.asarray(value.astype(jnp.float32) if value.dtype == jnp.bfloat16 else value)
    return out


def _read_hf_folder(folder: str) -> StateDict:
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return _read_safetensors(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out: StateDict = {}
        for shard in shards:
            out.update(_read_safetensors(os.path.join(folder, shard)))
        return out
    for name in ("pytorch_model.bin", "model.pth", "model.pt"):
        if os.path.isfile(os.path.join(folder, name)):
            return _read_torch_file(os.path.join(folder, name))
    raise FileNotFoundError(
        f"{folder} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
        f"it holds: {sorted(os.listdir(folder))[:20]}")


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Flat {key: numpy array} from a checkpoint file or a Hugging Face model folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_hf_folder(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file or folder at {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        return _read_safetensors(path)
    if ext in (".bin", ".pth", ".pt", ".ckpt"):
        return _read_torch_file(path)
    raise ValueError(f"unknown checkpoint format {ext!r} for {path}: expected .safetensors, .bin, .pth, .pt, "
                     ".ckpt or a Hugging Face folder")


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's config.json as a dict, or None when there is none."""
    path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def strip_prefix(state: Mapping[str, np.ndarray], prefix: str) -> StateDict:
    """Removes `prefix` from every key that starts with it; other keys are kept unchanged (they will show
    up as unused if nothing maps them)."""
    if not prefix:
        return dict(state)
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


# ----------------------------------------------------------------------------------------------------
# Layout conversion
# ----------------------------------------------------------------------------------------------------


def torch_linear_to_kernel(weight: np.ndarray) -> np.ndarray:
    """torch nn.Linear weight [out, in] -> our kernel [in, out] (a view: the copy happens once, on device)."""
    if weight.ndim != 2:
        raise ValueError(f"a Linear weight must be 2-D, got shape {weight.shape}")
    return weight.T


def torch_conv_to_kernel(weight: np.ndarray) -> np.ndarray:
    """torch ConvNd weight [out, in, *spatial] -> our (channels-last) kernel [*spatial, in, out]."""
    if weight.ndim < 3:
        raise ValueError(f"a conv weight must be at least 3-D, got shape {weight.shape}")
    spatial = tuple(range(2, weight.ndim))
    return weight.transpose(spatial + (1, 0))


def torch_linear_or_1x1_conv_to_kernel(weight: np.ndarray) -> np.ndarray:
    """A torch Linear weight [out, in], or a 1x1 Conv2d weight [out, in, 1, 1] used as one -> kernel [in, out]."""
    if weight.ndim == 4:
        if weight.shape[2:] != (1, 1):
            raise CheckpointMismatchError(f"expected a 1x1 conv weight, got shape {weight.shape}")
        weight = weight[:, :, 0, 0]
    return torch_linear_to_kernel(weight)


# ----------------------------------------------------------------------------------------------------
# Weight maps: one table of rules per model family
# ----------------------------------------------------------------------------------------------------

# Layout changes, official -> ours, and their inverses (ours -> official) where the families need them.
LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "same": lambda x: x,
    "linear": torch_linear_to_kernel,
    "conv": torch_conv_to_kernel,
    "linear_or_1x1": torch_linear_or_1x1_conv_to_kernel,
}
INVERSE_LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "same": lambda x: x,
    "linear": lambda x: np.asarray(x).T,
}

_FIELD = re.compile(r"\{(\w+)(?::([^}]*))?\}")


@functools.lru_cache(maxsize=None)
def _template_regex(template: str, fields_from: str = "") -> re.Pattern:
    """The regex of a template; a field without its own alternatives takes those it has in `fields_from`
    (our path templates reuse the official template's fields)."""
    inherited = dict(_FIELD.findall(fields_from))
    parts, last = [], 0
    for m in _FIELD.finditer(template):
        parts.append(re.escape(template[last:m.start()]))
        name, choices = m.groups()
        choices = choices if choices is not None else (inherited.get(name) or None)
        if choices is None:
            pattern = r"\d+" if name == "i" else r"[^.]+"
        elif re.fullmatch(r"[\w.|]+", choices):  # plain alternatives: their dots are literal
            pattern = "|".join(re.escape(c) for c in choices.split("|"))
        else:
            pattern = choices
        parts.append(f"(?P<{name}>{pattern})")
        last = m.end()
    parts.append(re.escape(template[last:]))
    return re.compile("".join(parts))


@dataclasses.dataclass(frozen=True)
class Rule:
    """One line of a weight map: an official checkpoint key template, our parameter path template, and the
    layout change of the tensor (a key of LAYOUTS).

    Templates name fields in braces. `{i}` is a layer index (digits); `{name:a|b}` is one of the listed
    alternatives (a regex); a bare `{name}` is one dotted part. The official key's fields fill our path:
    Rule("blocks.{i}.mlp.{proj:fc1|fc2}.weight", "layer.{i}.mlp.{proj}.kernel", "linear")."""

    official: str
    ours: str
    layout: str = "same"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; known: {sorted(LAYOUTS)}")

    def match(self, key: str) -> dict[str, str] | None:
        """The fields of `key` when it is an official key of this rule, else None."""
        m = _template_regex(self.official).fullmatch(key)
        return m.groupdict() if m else None

    def match_ours(self, path: str) -> dict[str, str] | None:
        m = _template_regex(self.ours, self.official).fullmatch(path)
        return m.groupdict() if m else None

    def fill(self, template: str, fields: Mapping[str, str]) -> str:
        return _FIELD.sub(lambda m: str(fields[m.group(1)]), template)

    def expand(self, num_layers: int) -> list[dict[str, str]]:
        """Every field assignment of this rule: `{i}` over range(num_layers), alternatives over their list
        (for families whose tables enumerate, e.g. to write official checkpoints)."""
        options = []
        for name, choices in _FIELD.findall(self.official):
            if name == "i":
                options.append([(name, str(i)) for i in range(num_layers)])
            elif choices and re.fullmatch(r"[\w.|]+", choices):
                options.append([(name, c) for c in choices.split("|")])
            else:
                raise ValueError(f"field {{{name}}} of {self.official!r} cannot be enumerated")
        return [dict(combo) for combo in itertools.product(*options)]


def map_weights(state: Mapping[str, np.ndarray], table: Iterable[Rule], *,
                dropped: re.Pattern | None = None) -> MappedParams:
    """{our parameter path: array} from official keys by the first matching rule of `table`; keys that match
    `dropped` are left out on purpose, keys no rule matches are kept in `.unmapped` (the strict fill reports
    them)."""
    table = tuple(table)
    params = MappedParams()
    for key, value in state.items():
        if dropped is not None and dropped.fullmatch(key):
            continue
        for rule in table:
            fields = rule.match(key)
            if fields is not None:
                try:
                    value = LAYOUTS[rule.layout](np.asarray(value))
                except ValueError as e:
                    raise CheckpointMismatchError(f"{key}: {e}") from None
                params.put(rule.fill(rule.ours, fields), value, key)
                break
        else:
            params.unmapped.append(key)
    return params


def unmap_weights(params: Mapping[str, np.ndarray], table: Iterable[Rule]) -> dict[str, np.ndarray]:
    """The inverse of map_weights: {official key: array} from {our parameter path: array} of either layout
    (stacked entries are split per layer first); a path no rule matches (or whose layout has no inverse) is
    an error."""
    table = tuple(table)
    params = unstack_layers(params)
    out = {}
    for path, value in params.items():
        for rule in table:
            fields = rule.match_ours(path)
            if fields is not None:
                if rule.layout not in INVERSE_LAYOUTS:
                    raise ValueError(f"{path}: layout {rule.layout!r} has no inverse")
                out[rule.fill(rule.official, fields)] = INVERSE_LAYOUTS[rule.layout](np.asarray(value))
                break
        else:
            raise ValueError(f"no rule of the weight map writes our parameter {path!r}")
    return out


def model_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """{dotted path: numpy array} of a concrete model's parameters."""
    return {path_to_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ----------------------------------------------------------------------------------------------------
# The two layouts of a block stack
# ----------------------------------------------------------------------------------------------------

_STACKED_PART = f".{STACKED}."


def _split_stacked(path: str) -> tuple[str, str] | None:
    """('encoder_blocks', 'mlp.up_proj.kernel') for 'encoder_blocks.stacked.mlp.up_proj.kernel', else None."""
    if _STACKED_PART not in path:
        return None
    prefix, rest = path.split(_STACKED_PART, 1)
    return prefix, rest


def layer_path(stacked_path: str, index: int) -> str:
    """'encoder_blocks.stacked.mlp.up_proj.kernel', 3 -> 'encoder_blocks.3.mlp.up_proj.kernel'."""
    prefix, rest = _split_stacked(stacked_path)
    return f"{prefix}.{index}.{rest}"


def unstack_layers(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{path: array} with every stacked entry ([L, ...] under `<stack>.stacked.`) split into L per-layer
    entries (`<stack>.{i}.`); other entries unchanged. The per-layer view of a model of either layout."""
    out = {}
    for path, value in params.items():
        if _split_stacked(path) is None:
            out[path] = value
            continue
        value = np.asarray(value)
        for i in range(value.shape[0]):
            out[layer_path(path, i)] = value[i]
    return out


def stack_layers(params: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
                 ) -> tuple["MappedParams", list[str], list[str], set[str]]:
    """For every stacked parameter path of a model (`shapes`: {path: shape}), the per-layer entries of
    `params` (`<stack>.{i}.<rest>`, i < L) stacked into ONE [L, ...] entry at the stacked path.

    Returns (params with the stacks assembled, missing layers, mis-shaped layers, the stacked paths those
    two lists already report). Layer keys beyond the model's depth stay as they are (the fill reports them
    unused); a stack none of whose layers is present is left for the fill to report missing."""
    out = MappedParams()
    out.update(params)
    out.source.update(getattr(params, "source", {}))
    out.unmapped.extend(getattr(params, "unmapped", []))
    missing, mismatched, reported = [], [], set()
    for path, shape in shapes.items():
        if _split_stacked(path) is None or path in params:
            continue
        keys = [layer_path(path, i) for i in range(shape[0])]
        present = [k for k in keys if k in params]
        if not present:
            continue
        bad = [f"{out.source.get(k, k)} (layer {i} of {path}): checkpoint {tuple(np.shape(params[k]))} vs model "
               f"{tuple(shape[1:])}" for i, k in enumerate(keys)
               if k in params and tuple(np.shape(params[k])) != tuple(shape[1:])]
        absent = [f"{k} (layer {i} of {path})" for i, k in enumerate(keys) if k not in params]
        for k in present:
            del out[k]
        if bad or absent:
            mismatched += bad
            missing += absent
            reported.add(path)
            continue
        first, last = out.source.pop(keys[0], keys[0]), out.source.get(keys[-1], keys[-1])
        for k in keys[1:]:
            out.source.pop(k, None)
        out[path] = np.stack([np.asarray(params[k]) for k in keys])
        out.source[path] = f"{first} .. {last}" if len(keys) > 1 else first
    return out, missing, mismatched, reported


# ----------------------------------------------------------------------------------------------------
# Filling an abstract model
# ----------------------------------------------------------------------------------------------------


def path_to_str(path: Iterable[Any]) -> str:
    """('layer', 0, 'norm1', 'weight') -> 'layer.0.norm1.weight'."""
    return ".".join(str(getattr(p, "key", p)) for p in path)


def model_param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """{dotted path: shape} of every variable of a (possibly abstract) model."""
    _, state = nnx.split(model)
    return {path_to_str(p): tuple(v.shape) for p, v in nnx.to_flat_state(state)}


class MappedParams(dict):
    """{our dotted parameter path: numpy array} that also remembers each entry's checkpoint key, so errors
    can name the checkpoint's own keys. Add entries with `put`."""

    def __init__(self):
        super().__init__()
        self.source: dict[str, str] = {}
        self.unmapped: list[str] = []  # checkpoint keys that no rule recognised

    def put(self, ours: str, value: np.ndarray, source: str) -> None:
        if ours in self:
            raise CheckpointMismatchError(f"checkpoint keys {self.source[ours]!r} and {source!r} both map to {ours!r}")
        self[ours] = value
        self.source[ours] = source


def fill_abstract_model(
    abstract_model: nnx.Module,
    params: Mapping[str, np.ndarray],
    *,
    dtype: Any = None,
    what: str = "checkpoint",
    unmapped_keys: Iterable[str] = (),
    sharding_for: Callable[[str, nnx.Variable], Any] | None = None,
) -> nnx.Module:
    """Returns a concrete model: `abstract_model`'s structure (from `nnx.eval_shape`) with every variable
    taken from `params` ({dotted path: array}), cast to the variable's own dtype (or `dtype`).

    Strict: raises one CheckpointMismatchError listing all entries of `params` the model does not have,
    all model variables that `params` lacks, all shape mismatches, and `unmapped_keys` (checkpoint keys
    the caller's renaming did not recognise). `params` names per-layer paths; a stack the model stores
    stacked (block_stack.BlockStack) is assembled from them (stack_layers), layer i at index i.

    `sharding_for(path, abstract_variable)` may return a jax Sharding per variable (e.g. from its logical axes
    and the mesh rules); each array then goes from host memory straight to its shards, never through one
    device. None (or a None result) puts it on the default device."""
    graphdef, state = nnx.split(abstract_model)
    flat = list(nnx.to_flat_state(state))
    wanted = {path_to_str(p): v for p, v in flat}
    params, layers_missing, layers_mismatched, reported = stack_layers(
        params, {k: tuple(v.shape) for k, v in wanted.items()})
    source = params.source
    unmapped = list(unmapped_keys) + list(params.unmapped)

    def named(ours: str) -> str:
        return f"{source[ours]} (-> {ours})" if ours in source and source[ours] != ours else ours

    unused = sorted(named(k) for k in params if k not in wanted) + sorted(unmapped)
    missing = sorted([k for k in wanted if k not in params and k not in reported] + layers_missing)
    mismatched = sorted(
        [f"{named(k)}: checkpoint {tuple(params[k].shape)} vs model {tuple(v.shape)}"
         for k, v in wanted.items() if k in params and tuple(params[k].shape) != tuple(v.shape)]
        + layers_mismatched)
    if unused or missing or mismatched:
        lines = [f"{what} does not match the model:"]
        for title, items in (("unused checkpoint entries", unused), ("missing model parameters", missing),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {item}" for item in items]
        raise CheckpointMismatchError("\n".join(lines))

    filled = []
    for path, var in flat:
        key = path_to_str(path)
        target_dtype = dtype if dtype is not None else var.get_value().dtype
        value = np.asarray(params[key])
        sharding = sharding_for(key, var) if sharding_for is not None else None
        if sharding is not None:
            array = jax.device_put(value.astype(target_dtype), sharding)
        else:
            array = jnp.asarray(value, dtype=target_dtype)
        filled.append((path, var.replace(array)))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
