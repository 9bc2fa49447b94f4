"""The official evaluation protocol: forecast features, read them with frozen task heads, score mIoU / RMSE.

For each dataset, clip (7 frames at a fixed stride), context length c (4) and horizon h (1, 3):
  * World models (DeltaWorld, DINO-World, copy-last) see the window that ENDS the clip: frames
    [T - c - h, T); the first c are context, the last h are predicted (timestamps are not re-based; the
    RoPE only sees differences). DeltaTok reconstructs the last h frames of the whole clip starting from
    the frame before them (its context length is 1, or 0 from a black frame when h == T).
  * Per predicted step t, the loss (the model's criterion: smooth-L1 beta 0.1 for world models, log-cosh
    for DeltaTok) and, when the step's labels have any valid pixel, the task metric on the head's output
    upsampled bilinearly to the label size.
  * Several samples per clip (DeltaWorld: N = 20): 'mean' scores the mean of the samples' features,
    'best' the sample whose LAST predicted frame has the lowest criterion to the truth.
  * Wide frames are two overlapping square crops (corners), labels split at the midpoint (no pixel
    scored twice); each crop's prediction is upsampled to a square of the label height and cut to its
    half (`align_to_task_output`), exactly as the official code does, quirks included (aspect >= 2 stretches).

Result keys: results[dataset][model]["c{ctx}_h{horizon}"][selection]["t{step}"] = {"loss", "miou" | "rmse"}
(the official metric names are c{ctx}_h{horizon}_t{step}_{seg_miou|depth_rmse}{_mean|_best}); the published
'1 frame' / '3 frames' numbers are t0 of c4_h1 and t2 of c4_h3. One-sample models (DeltaTok, whose official
keys have no suffix, DINO-World, copy-last) only have 'mean'. Each metric pools ALL clips of a dataset
(torchmetrics state over the validation epoch), not a mean of per-batch values.

Batches: dicts with `frames` uint8 [B, T, H, W, 3], `timestamps` float32 [B, T] and optionally `labels`
[B, T, h, w] (integer class ids with 255 = ignore for segmentation; float depth in metres with 0 = invalid).
Metric states are sums (see evaluation/metrics.py), so results do not depend on batching or sharding.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from functools import partial
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltaworld_jax.data.sampling import square_crops
from deltaworld_jax.models.heads import DepthHead, SegHead
from deltaworld_jax.evaluation.metrics import MeanIoU, RootMeanSquaredError, iou_from_confusion
# The forecasters live in forecasters.py; the protocol below and callers use them as evaluation.<name>.
from deltaworld_jax.evaluation.forecasters import (  # noqa: F401
    ClipFeatures,
    CopyLast,
    DeltaTokReconstruction,
    DeltaWorldForecaster,
    DINOWorldForecaster,
    Forecast,
    Forecaster,
    jit_deltaworld_rollout,
    select_samples,
    world_criterion,
)

Array = jax.Array

# ----------------------------------------------------------------------------------------------------
# Wide frames: square crops, label halves, and aligning predictions back to the labels
# ----------------------------------------------------------------------------------------------------


def resize_bilinear(x: Array, size_hw: tuple[int, int]) -> Array:
    """[B, h, w, C] -> [B, H, W, C] like torch F.interpolate(mode='bilinear', align_corners=False):
    half-pixel centres, two taps, no antialiasing."""
    b, _, _, c = x.shape
    return jax.image.resize(x.astype(jnp.float32), (b, *size_hw, c), method="linear", antialias=False)


def align_to_task_output(x: Array, target_hw: tuple[int, int], overlap: bool, is_wide: bool | None,
                         is_second_crop: bool = False) -> Array:
    """Upsample a crop's head output [B, h, w, C] onto its label half [target_hw] (the official rules)."""
    th, tw = target_hw
    if not overlap:
        return resize_bilinear(x, (th, tw))
    square = max(th, tw)
    up = resize_bilinear(x, (square, square))
    if not is_second_crop:
        return up[:, :th, :tw]
    if is_wide:
        return up[:, :th, square - tw:]
    return up[:, square - th:, :tw]


def upsample_to_labels(x: Array, target_hw: tuple[int, int], overlap: bool, is_wide: bool | None) -> Array:
    """The first half of the batch are first crops, the second half second crops (see data.sampling.square_crops)."""
    if is_wide is None:
        return resize_bilinear(x, target_hw)
    half = x.shape[0] // 2
    return jnp.concatenate([align_to_task_output(x[:half], target_hw, overlap, is_wide, False),
                            align_to_task_output(x[half:], target_hw, overlap, is_wide, True)], axis=0)


# ----------------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    ctx_lens: tuple[int, ...] = (4,)
    horizons: tuple[int, ...] = (1, 3)
    seed: int = 0
    max_batches: int = 0  # per dataset; 0 = all

    @classmethod
    def from_config(cls, config: Any | None) -> "EvalSettings":
        """From `config.eval` (ml_collections or dict); missing fields keep the official defaults."""
        if config is None:
            return cls()
        get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
        return cls(ctx_lens=tuple(get("ctx_lens", (4,))), horizons=tuple(get("horizons", (1, 3))),
                   seed=int(get("seed", 0)), max_batches=int(get("max_batches", 0)))


@dataclasses.dataclass
class _Mean:
    total: float = 0.0
    count: int = 0

    def add(self, values) -> None:
        values = np.asarray(jax.device_get(values), np.float64)
        self.total += float(values.sum())
        self.count += values.size

    def compute(self) -> float:
        return self.total / self.count if self.count else float("nan")


def _place_local(x: np.ndarray) -> Array:
    """Split a host batch over this host's devices (data parallel; jit follows the sharding) when it divides
    evenly, else put it on one device. Each host evaluates its own clips; results() sums over hosts."""
    devices = jax.local_devices()
    if len(devices) > 1 and x.shape[0] % len(devices) == 0:
        mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))
    return jnp.asarray(x)


@nnx.jit
def vfm_features(vfm, frames):
    return vfm(frames)


@partial(jax.jit, static_argnums=0)
def _per_clip_loss(criterion, preds, targets):
    return jnp.mean(criterion(preds, targets), axis=(-2, -1))


@partial(nnx.jit, static_argnames=("grid_hw", "target_hw", "overlap", "is_wide"))
def _head_on_labels(head, feats_bnd, *, grid_hw, target_hw, overlap, is_wide):
    return upsample_to_labels(_apply_head(head, feats_bnd, grid_hw), target_hw, overlap, is_wide)


def _apply_head(head, feats_bnd: Array, grid_hw) -> Array:
    b, n, d = feats_bnd.shape
    out = head(feats_bnd.reshape(b, *grid_hw, d))
    return out if out.ndim == 4 else out[..., None]  # depth [B, h, w] -> [B, h, w, 1]


def _square_batch(batch: Mapping[str, Any]):
    """(frames, labels, overlap, is_wide, timestamps) with square frames: batches from the data pipeline
    arrive already split (they carry `is_split` / `is_wide` / `overlap`); others are split here."""
    labels = batch.get("labels")
    labels = None if labels is None else np.asarray(labels)
    frames = np.asarray(batch["frames"])
    timestamps = np.asarray(batch["timestamps"], np.float32)
    if "is_split" in batch:
        if frames.shape[-3] != frames.shape[-2]:
            raise ValueError(f"a batch marked is_split has non-square frames {frames.shape}")
        if not np.asarray(batch["is_split"]).any():
            return frames, labels, False, None, timestamps
        return frames, labels, bool(np.asarray(batch["overlap"])[0]), bool(np.asarray(batch["is_wide"])[0]), timestamps
    frames, labels, overlap, is_wide = square_crops(frames, labels)
    if is_wide is not None:
        timestamps = np.concatenate([timestamps, timestamps], axis=0)
    return frames, labels, overlap, is_wide, timestamps


class Evaluator:
    """Accumulates losses and metrics for every (dataset, model, c/h, selection, step); `results()`."""

    def __init__(self, forecasters: Iterable[Forecaster], vfm: nnx.Module, heads: Mapping[str, nnx.Module],
                 settings: EvalSettings = EvalSettings()):
        self.forecasters = list(forecasters)
        self.vfm, self.heads, self.settings = vfm, dict(heads), settings
        self.losses: dict[tuple, _Mean] = {}
        self.metrics: dict[tuple, MeanIoU | RootMeanSquaredError] = {}
        self._black: dict[tuple, Array] = {}

    def _new_metric(self, head):
        if isinstance(head, SegHead):
            return "miou", MeanIoU(head.num_classes)
        if isinstance(head, DepthHead):
            return "rmse", RootMeanSquaredError()
        raise TypeError(f"no metric for head {type(head).__name__}")

    def _black_features(self, hw: tuple[int, int]) -> Array:
        if hw not in self._black:
            self._black[hw] = vfm_features(self.vfm, jnp.zeros((1, *hw, 3), jnp.uint8))
        return self._black[hw]

    def clip_features(self, frames: np.ndarray, timestamps: np.ndarray) -> ClipFeatures:
        hw = tuple(frames.shape[-3:-1])
        p = self.vfm.patch_size
        if hw[0] % p or hw[1] % p:
            raise ValueError(f"frame size {hw} is not a multiple of the VFM patch size {p}")
        feats = vfm_features(self.vfm, _place_local(frames))
        return ClipFeatures(feats, _place_local(np.asarray(timestamps, np.float32)), (hw[0] // p, hw[1] // p),
                            self._black_features(hw))

    def update(self, dataset: str, batch: Mapping[str, Any], rng: Array) -> list[dict]:
        """Score one batch; returns per (model, c/h) what pictures need (clip, forecast, selections)."""
        frames, labels, overlap, is_wide, timestamps = _square_batch(batch)
        clip = self.clip_features(frames, timestamps)
        head = self.heads.get(dataset)
        num_frames = frames.shape[1]
        outputs = []
        for f_index, forecaster in enumerate(self.forecasters):
            # DeltaTok chooses its own context (the frame before the horizon): one pass per horizon.
            ctx_lens = self.settings.ctx_lens if getattr(forecaster, "uses_context", True) else (None,)
            for c_index, ctx_len in enumerate(ctx_lens):
                for h_index, horizon in enumerate(self.settings.horizons):
                    if (ctx_len or 0) + horizon > num_frames:
                        continue
                    key_rng = jax.random.fold_in(rng, (f_index * 64 + c_index) * 64 + h_index)
                    forecast = forecaster(clip, ctx_len=ctx_len, horizon=horizon, rng=key_rng)
                    selections = select_samples(forecast, forecaster.criterion)
                    for selection, (preds, _) in selections.items():
                        key = (dataset, forecaster.name, f"c{forecast.ctx_len}_h{horizon}", selection)
                        self._score(key, preds, forecast.targets, labels, horizon, head, clip.grid_hw,
                                    overlap, is_wide, forecaster.criterion)
                    outputs.append(dict(model=forecaster.name, ctx_len=forecast.ctx_len, horizon=horizon,
                                        frames=frames, labels=labels, clip=clip, forecast=forecast,
                                        selections=selections, overlap=overlap, is_wide=is_wide))
        return outputs

    def _score(self, key, preds, targets, labels, horizon, head, grid_hw, overlap, is_wide, criterion):
        num_preds = preds.shape[1]
        for t in range(num_preds):
            step = horizon - num_preds + t
            per_clip = _per_clip_loss(criterion, preds[:, t], targets[:, step])
            self.losses.setdefault((*key, f"t{step}"), _Mean()).add(per_clip)
            if head is None or labels is None:
                continue
            step_labels = labels[:, labels.shape[1] - horizon + step]
            valid = (step_labels != 255) if isinstance(head, SegHead) else (step_labels > 0)
            if not valid.any():
                continue
            out = _head_on_labels(head, preds[:, t], grid_hw=tuple(grid_hw), target_hw=tuple(step_labels.shape[-2:]),
                                  overlap=overlap, is_wide=is_wide)
            metric_key = (*key, f"t{step}")
            if metric_key not in self.metrics:
                self.metrics[metric_key] = self._new_metric(head)[1]
            metric = self.metrics[metric_key]
            if isinstance(metric, MeanIoU):
                metric.update(out, jnp.asarray(step_labels))
            else:
                metric.update(out[..., 0], jnp.asarray(step_labels, jnp.float32))

    def states(self) -> dict[str, np.ndarray]:
        """Every accumulator as a float64 vector under a string key (sum-reducible across hosts)."""
        out = {"|".join(k) + "|loss": np.array([m.total, m.count], np.float64) for k, m in self.losses.items()}
        for k, m in self.metrics.items():
            if isinstance(m, MeanIoU):
                out["|".join(k) + "|miou"] = m.confusion.astype(np.float64).reshape(-1)
            else:
                out["|".join(k) + "|rmse"] = np.array([m.sum_squared_error, m.count], np.float64)
        return out

    def results(self, gather: Callable[[bytes], list[bytes]] | None = None) -> dict:
        """{dataset: {model: {"c4_h3": {selection: {"t2": {"loss": .., "miou"|"rmse": ..}, "loss": mean}}}}},
        summed over all hosts (`gather` collects every host's serialised states; default: jax processes).
        mIoU is in percent (as published), RMSE in metres."""
        states = _sum_over_hosts(self.states(), gather)
        out: dict = {}
        for name in sorted(states):
            *key, kind = name.split("|")
            dataset, model, ch, selection, step = key
            entry = out.setdefault(dataset, {}).setdefault(model, {}).setdefault(ch, {}).setdefault(selection, {})
            value = states[name]
            if kind == "loss":
                entry.setdefault(step, {})["loss"] = value[0] / value[1] if value[1] else float("nan")
            elif kind == "miou":
                classes = int(round(np.sqrt(value.size)))
                entry.setdefault(step, {})["miou"] = 100.0 * iou_from_confusion(value.reshape(classes, classes))[0]
            else:
                entry.setdefault(step, {})["rmse"] = float(np.sqrt(value[0] / value[1])) if value[1] else float("nan")
        for models in out.values():
            for chs in models.values():
                for selections in chs.values():
                    for entry in selections.values():
                        steps = [v["loss"] for k, v in entry.items() if k.startswith("t")]
                        entry["loss"] = float(np.mean(steps))
        return out


def _serialise(states: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **states)
    return buffer.getvalue()


def _gather_from_processes(blob: bytes) -> list[bytes]:
    """Every process's bytes (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return [blob]
    from jax.experimental import multihost_utils

    sizes = multihost_utils.process_allgather(np.array([len(blob)], np.int32)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(blob)] = np.frombuffer(blob, np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [row[:size].tobytes() for row, size in zip(everyone, sizes)]


def _sum_over_hosts(states: dict[str, np.ndarray], gather=None) -> dict[str, np.ndarray]:
    """Sum of every host's states, key by key (a key some host never saw counts as zero there). States are
    exchanged as bytes so counts stay exact (no float32 round trip)."""
    total: dict[str, np.ndarray] = {}
    for blob in (gather or _gather_from_processes)(_serialise(states)):
        with np.load(io.BytesIO(blob)) as host:
            for key in host.files:
                total[key] = total[key] + host[key] if key in total else host[key].copy()
    return total


def evaluate(forecasters: Iterable[Forecaster], vfm: nnx.Module, eval_data: Mapping[str, Iterable[Mapping]],
             heads: Mapping[str, nnx.Module], settings: EvalSettings | Any = None,
             on_batch: Callable[[str, int, list[dict]], None] | None = None) -> dict:
    """Run the protocol over every dataset ({name: iterable of batches}); `heads` maps a dataset name to its
    head ('vspw', 'cityscapes': SegHead; 'kitti': DepthHead; datasets without one get losses only).
    `on_batch(dataset, batch_index, outputs)` sees each batch's forecasts (e.g. to draw pictures)."""
    if not isinstance(settings, EvalSettings):
        settings = EvalSettings.from_config(settings)
    evaluator = Evaluator(forecasters, vfm, heads, settings)
    rng = jax.random.key(settings.seed)
    for d_index, (dataset, batches) in enumerate(eval_data.items()):
        for index, batch in enumerate(batches):
            if settings.max_batches and index >= settings.max_batches:
                break
            outputs = evaluator.update(dataset, batch, jax.random.fold_in(jax.random.fold_in(rng, d_index), index))
            if on_batch is not None:
                on_batch(dataset, index, outputs)
    return evaluator.results()


# ----------------------------------------------------------------------------------------------------
# Results table
# ----------------------------------------------------------------------------------------------------


def headline(results: dict) -> list[dict]:
    """One row per (dataset, model, selection, c/h): the metric of the LAST predicted frame (the published
    '1 frame' / '3 frames' numbers) and the mean loss over the horizon."""
    rows = []
    for dataset, models in results.items():
        for model, chs in models.items():
            for ch, selections in chs.items():
                for selection, entry in selections.items():
                    last = max((k for k in entry if k.startswith("t")), key=lambda k: int(k[1:]))
                    metric = {k: v for k, v in entry[last].items() if k != "loss"}
                    rows.append(dict(dataset=dataset, model=model, selection=selection, setting=ch, step=last,
                                     loss=entry["loss"], **metric))
    return rows


def write_results(results: dict, workdir: str, name: str = "eval_results") -> tuple[str, str]:
    """Write `<name>.json` (everything) and `<name>.md` (the headline table) to workdir; returns both paths."""
    from etils import epath

    directory = epath.Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / f"{name}.json", directory / f"{name}.md"
    json_path.write_text(json.dumps(results, indent=2, sort_keys=True))
    lines = ["| dataset | model | selection | setting | scored frame | loss | mIoU | RMSE |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{v:.4g}" if not np.isnan(v) else "nan"
    for row in headline(results):
        lines.append(f"| {row['dataset']} | {row['model']} | {row['selection']} | {row['setting']} | {row['step']} "
                     f"| {fmt(row['loss'])} | {fmt(row.get('miou'))} | {fmt(row.get('rmse'))} |")
    md_path.write_text("\n".join(lines) + "\n")
    return os.fspath(json_path), os.fspath(md_path)


# ----------------------------------------------------------------------------------------------------
# The trainer's evaluation hook
# ----------------------------------------------------------------------------------------------------

_HEAD_KINDS = {"vspw": "seg-head-vspw", "cityscapes": "seg-head-cityscapes", "kitti": "depth-head-kitti"}


def _get(config: Any, name: str, default: Any) -> Any:
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def forecasters_for(kind: str, trainable: nnx.Module, frozen: Any, *, num_samples: int | None = None,
                    copy_last: bool = True) -> tuple[list[Forecaster], nnx.Module]:
    """The forecasters of a model family (config.model.kind) and the VFM they read."""
    if kind == "deltatok":
        return [DeltaTokReconstruction(trainable)], frozen
    vfm = frozen["vfm"]
    if kind == "deltaworld":
        models = [DeltaWorldForecaster(trainable, frozen["tokenizer"], num_samples or trainable.num_rollout_samples)]
    elif kind == "dinoworld":
        models = [DINOWorldForecaster(trainable, num_samples)]
    else:
        raise ValueError(f"no evaluation for model kind {kind!r}")
    return models + ([CopyLast()] if copy_last else []), vfm


def load_heads(paths: Mapping[str, str], vfm: nnx.Module) -> dict[str, nnx.Module]:
    """{dataset or 'rgb': head} from {dataset or 'rgb': weights path} (official head checkpoints)."""
    from deltaworld_jax.pretrained.heads import load_head

    heads = {}
    for name, path in dict(paths).items():
        if not path:
            continue
        if name == "rgb":
            norm = getattr(vfm, "norm", None)
            if norm is None:
                raise ValueError("the RGB head decodes DINOv3 features; this VFM has no final norm")
            heads[name] = load_head(path, "rgb-head-imagenet", norm_weight=np.asarray(norm.weight[...]),
                                    norm_bias=np.asarray(norm.bias[...]))
        elif name in _HEAD_KINDS:
            heads[name] = load_head(path, _HEAD_KINDS[name])
        else:
            raise ValueError(f"no head kind for {name!r}; expected one of {sorted(_HEAD_KINDS)} or 'rgb'")
    return heads


def flatten_results(results: dict) -> dict[str, float]:
    """{'<dataset>/<model>/<c_h>/<selection>/<t or mean>_<metric>': value} for scalar writers."""
    flat = {}
    for dataset, models in results.items():
        for model, chs in models.items():
            for ch, selections in chs.items():
                for selection, entry in selections.items():
                    prefix = f"{dataset}/{model}/{ch}/{selection}"
                    for step, values in entry.items():
                        if step == "loss":
                            flat[f"{prefix}/loss"] = values
                        else:
                            flat.update({f"{prefix}/{step}_{k}": v for k, v in values.items()})
    return flat


def eval_hook(config, trainable: nnx.Module, frozen: Any, step: int) -> dict[str, Any]:
    """The trainer's hook (config.eval.fn = 'deltaworld_jax.evaluation.protocol:eval_hook'): the official
    protocol on config.eval.datasets ('vspw,cityscapes,kitti' or a sequence; default 'synthetic') with heads config.eval.heads {dataset|'rgb': path};
    returns flat scalars and, for the first config.eval.num_plots clips (default 1), uint8 pictures. When
    config.eval.results_dir is set, also writes eval_results_<step>.json/.md there.
    Other fields: ctx_lens (4,), horizons (1, 3), num_samples (the model's), copy_last (True), max_batches, seed."""
    from deltaworld_jax.data import make_eval_iterator
    from deltaworld_jax.evaluation import pictures, setup as eval_setup

    settings_config = config.eval
    forecasters, vfm = forecasters_for(config.model.kind, trainable, frozen,
                                       num_samples=_get(settings_config, "num_samples", 0) or None,
                                       copy_last=bool(_get(settings_config, "copy_last", True)))
    heads = load_heads(_get(settings_config, "heads", {}), vfm)
    num_plots = int(_get(settings_config, "num_plots", 1))
    names = eval_setup.datasets({"datasets": _get(settings_config, "datasets", ("synthetic",))})
    data = {name: make_eval_iterator(config.data, name, process_index=jax.process_index(),
                                     process_count=jax.process_count())
            for name in names}
    images: dict[str, np.ndarray] = {}

    def draw(dataset: str, index: int, outputs: list[dict]) -> None:
        if index or jax.process_index():
            return
        for output in outputs:
            for clip in range(min(num_plots, output["frames"].shape[0])):
                prefix = f"{dataset}/{output['model']}/c{output['ctx_len']}_h{output['horizon']}/s{clip}"
                drawn = pictures.evaluation_pictures(output, head=heads.get(dataset), rgb_head=heads.get("rgb"),
                                                     index=clip)
                images.update({f"{prefix}/{k}": v for k, v in drawn.items()})

    results = evaluate(forecasters, vfm, data, heads, settings_config, on_batch=draw if num_plots else None)
    results_dir = _get(settings_config, "results_dir", "")
    if results_dir and jax.process_index() == 0:
        write_results(results, results_dir, name=f"eval_results_{step}")
    return {**flatten_results(results), **images}
