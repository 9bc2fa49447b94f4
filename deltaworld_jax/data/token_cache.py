"""Precomputed delta tokens: DeltaWorld trains from tokens alone (batch["tokens"]), without the VFM and the
tokenizer in the step.

Which tokens. A DeltaWorld training clip (data/sampling.py) picks T frames of a video with random time
strides in `time_stride_range` (nearest frame to each target time) and needs the tokens of the pairs
(black, f_i0), (f_i0, f_i1), ..., (f_i{T-2}, f_i{T-1}). So for every frame i of a video the cache holds
  black[i]      = encode(VFM(black frame), VFM(frame i))
  pairs[i, k]   = encode(VFM(frame i), VFM(frame i + offsets[k]))   for offsets 0..G,
where G is the largest index gap the sampler can produce: ceil((max stride + largest frame interval) /
smallest frame interval) (10 at 25 fps for the recipe's 1/3 s; offset 0 is reachable when the smallest
stride is shorter than a frame interval). Any clip the sampler can draw is then a lookup, so training
from the cache samples exactly the clips the frame path samples.

Documented difference: frames are center-cropped to a square and resized to config.data.frame_size
ONCE (no RandomResizedCrop / flip augmentation, which would need a token per crop).

Cost: one VFM pass per frame plus (G + 2) encoder passes per frame; tokens are stored in the
tokenizer's compute dtype (bf16 in the recipe: lossless, the encoder's output already is bf16).
Layout: <output>/index.json and one <output>/video_<i>.npz per video (timestamps, black, pairs, offsets).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image

from deltaworld_jax.models.deltatok import DeltaTok

INDEX = "index.json"


def max_index_gap(timestamps: np.ndarray, stride_range: tuple[float, float]) -> int:
    """The largest gap between consecutive frame indices the random-stride sampler can produce."""
    dt = np.diff(np.asarray(timestamps, np.float64))
    dt = dt[dt > 0]
    if dt.size == 0:
        return 0
    return int(math.ceil((stride_range[1] + dt.max()) / dt.min()))


def center_square_transform(frame_size: int):
    """Deterministic frame transform: center crop to a square, bilinear resize to frame_size, uint8 HWC."""

    def transform(frame) -> np.ndarray:
        image = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame))
        w, h = image.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side)).convert("RGB")
        if side != frame_size:
            image = image.resize((frame_size, frame_size), Image.BILINEAR)
        return np.asarray(image, np.uint8)

    return transform


class VideoTokenizer:
    """Jitted VFM features and pair encodes for one (VFM, DeltaTok) pair, in inference mode (no RoPE
    augmentation, as the frozen tokenizer inside DeltaWorld training).

    The modules are split once and the jitted functions take their states as plain arrays (an nnx.jit
    call re-flattens the module graph every time: ~25 ms per call for the demo's tiny models, which made
    dispatch, not compute, the cost of a cache). Calls run `chunk` frames or pairs at most (default: about
    32k patch tokens per call, e.g. 32 frames at 512px, 512 at the demo's 64 patches) and are padded up to a
    power of two, so a handful of shapes is compiled whatever the video lengths."""

    def __init__(self, vfm, tokenizer: DeltaTok, frame_hw: tuple[int, int], chunk: int = 0):
        grid = (frame_hw[0] // vfm.patch_size, frame_hw[1] // vfm.patch_size)
        self.chunk = int(chunk) or max(1, min(1024, 32768 // (grid[0] * grid[1])))
        self.frame_hw = frame_hw
        vfm_def, self._vfm_state = nnx.split(vfm)
        tok_def, self._tok_state = nnx.split(tokenizer)
        rope = tokenizer.rope(grid)
        self._features = jax.jit(lambda state, f: nnx.merge(vfm_def, state)(f))
        self._encode = jax.jit(lambda state, x, y: nnx.merge(tok_def, state).encode(x, y, rope)[:, 0])
        self.vfm, self.tokenizer = vfm, tokenizer
        self._black = None

    def _in_chunks(self, fn, state, *arrays) -> list:
        """fn(state, *chunk) over the leading axis in chunks of at most `self.chunk`, each padded with zeros
        up to a power of two (the outputs' padding rows are dropped)."""
        out, i, total = [], 0, arrays[0].shape[0]
        while i < total:
            size = min(self.chunk, 1 << max(0, total - i - 1).bit_length())
            parts = [a[i:i + size] for a in arrays]
            pad = size - parts[0].shape[0]
            if pad:
                parts = [jnp.concatenate([jnp.asarray(p), jnp.zeros((pad,) + p.shape[1:], p.dtype)]) for p in parts]
            out.append(fn(state, *map(jnp.asarray, parts))[: size - pad])
            i += size
        return out

    def features(self, frames: np.ndarray) -> jax.Array:
        """[F, H, W, 3] uint8 -> [F, N, D]."""
        return jnp.concatenate(self._in_chunks(self._features, self._vfm_state, frames), 0)

    def encode(self, prev: jax.Array, cur: jax.Array) -> np.ndarray:
        """Delta tokens [P, D] of P pairs (prev [P, N, D] -> cur [P, N, D])."""
        return np.concatenate([np.asarray(t) for t in self._in_chunks(self._encode, self._tok_state, prev, cur)], 0)

    def video_tokens(self, frames: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(black [F, D], pairs [F, K, D]) of one video's frames; pairs past the last frame are zero."""
        return self.videos_tokens([frames], [offsets])[0]

    def videos_tokens(self, videos_frames: list[np.ndarray],
                      videos_offsets: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """video_tokens of several videos at once: their frames go through the VFM together and all their pairs
        through the encoder together, so short videos (the demo's 20-frame world clips) fill whole calls
        instead of paying a padded call and its dispatch each."""
        counts = [len(frames) for frames in videos_frames]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        feats = self.features(np.concatenate(videos_frames, 0))
        if self._black is None:  # the same all-black frame for every video
            self._black = self.features(np.zeros((1,) + videos_frames[0].shape[1:], np.uint8))
        black_tokens = self.encode(jnp.broadcast_to(self._black, feats.shape), feats)
        firsts, seconds = [], []
        for start, count, offsets in zip(starts, counts, videos_offsets):
            for offset in offsets:
                idx = start + np.arange(0, count - int(offset))
                firsts.append(idx)
                seconds.append(idx + int(offset))
        firsts, seconds = np.concatenate(firsts), np.concatenate(seconds)
        pair_tokens = self.encode(feats[firsts], feats[seconds])
        out, used = [], 0
        for start, count, offsets in zip(starts, counts, videos_offsets):
            pairs = np.zeros((count, len(offsets), pair_tokens.shape[-1]), pair_tokens.dtype)
            for k, offset in enumerate(offsets):
                n = max(0, count - int(offset))
                pairs[:n, k] = pair_tokens[used:used + n]
                used += n
            out.append((black_tokens[start:start + count], pairs))
        return out


def _store(array: np.ndarray) -> np.ndarray:
    return array.view(np.uint16) if array.dtype == ml_dtypes.bfloat16 else array


def _load(array: np.ndarray, dtype: str) -> np.ndarray:
    return array.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else array


def write_token_cache(config, output: str, vfm, tokenizer: DeltaTok, *, num_clips: int | None = None,
                      source=None) -> dict[str, Any]:
    """Tokenise every video of config.data's training source (or the first `num_clips`) into `output` with
    the frozen `vfm` and `tokenizer` (those DeltaWorld training of `config` uses: its task's frozen modules,
    built by the caller)."""
    from deltaworld_jax.data import pipeline

    data = config.data
    source = pipeline.make_train_source(data) if source is None else source
    size = int(data.frame_size)
    stride_range = tuple(float(s) for s in data.time_stride_range)
    videos = range(len(source) if num_clips is None else min(num_clips, len(source)))
    worker = VideoTokenizer(vfm, tokenizer, (size, size))
    transform = center_square_transform(size)
    os.makedirs(output, exist_ok=True)
    dtype = None
    t0 = time.perf_counter()
    frames_total = pairs_total = 0
    report_every = max(1, len(videos) // 10)
    done = 0
    group: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # (video, timestamps, frames, offsets)

    def flush() -> None:
        nonlocal done, dtype, frames_total, pairs_total
        results = worker.videos_tokens([g[2] for g in group], [g[3] for g in group])
        for (video, timestamps, frames, offsets), (black, pairs) in zip(group, results):
            dtype = str(black.dtype)
            np.savez(os.path.join(output, f"video_{video:08d}.npz"), timestamps=timestamps, offsets=offsets,
                     black=_store(black), pairs=_store(pairs))
            frames_total += len(frames)
            pairs_total += len(frames) + int(sum(max(0, len(frames) - o) for o in offsets))
            done += 1
            if done % report_every == 0 or done == len(videos):  # progress, as the trainer's steps/s and ETA
                elapsed = time.perf_counter() - t0
                logging.info("token cache: %d/%d videos (%.0f%%), %.1f frames/s, ETA %.0f s", done, len(videos),
                             100.0 * done / len(videos), frames_total / max(elapsed, 1e-9),
                             elapsed / done * (len(videos) - done))
        group.clear()

    # Videos are tokenised in groups of about one call's worth of frames (worker.chunk).
    for video in videos:
        timestamps = np.asarray(source.frame_timestamps(video), np.float32)
        frames = np.stack(source.read_frames(video, range(len(timestamps)), transform))
        offsets = np.arange(0, max_index_gap(timestamps, stride_range) + 1)
        group.append((video, timestamps, frames, offsets))
        if sum(len(g[2]) for g in group) >= worker.chunk:
            flush()
    if group:
        flush()
    seconds = time.perf_counter() - t0
    index = {"num_videos": len(videos), "dtype": dtype, "frame_size": size, "stride_range": list(stride_range),
             "width": int(tokenizer.cfg.hidden_size), "source": str(getattr(source, "root", data.source))}
    with open(os.path.join(output, INDEX), "w") as f:
        json.dump(index, f, indent=1)
    return {**index, "output": output, "frames": frames_total, "encoded_pairs": pairs_total, "seconds": seconds,
            "frames_per_second": frames_total / max(seconds, 1e-9)}


def format_summary(s: dict[str, Any]) -> str:
    return (f"wrote {s['num_videos']} videos ({s['frames']} frames, {s['encoded_pairs']} encoded pairs, "
            f"{s['dtype']} tokens of width {s['width']}) to {s['output']} in {s['seconds']:.1f} s "
            f"({s['frames_per_second']:.2f} frames/s)")


class TokenCache:
    """Reads a token cache and assembles the tokens of any clip the training sampler draws."""

    def __init__(self, root: str):
        path = os.path.join(root, INDEX)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no token cache at {root!r} ({INDEX} is missing): write one with `python -m "
                                    "benchmarks.benchmark tokens --config=... --output=...` or let the recipe "
                                    "build it (config.data.token_cache='@<name>')")
        with open(path) as f:
            self.index = json.load(f)
        self.root = root

    def __len__(self) -> int:
        return int(self.index["num_videos"])

    def video(self, video: int) -> dict[str, np.ndarray]:
        with np.load(os.path.join(self.root, f"video_{video:08d}.npz")) as z:
            dtype = self.index["dtype"]
            return {"timestamps": z["timestamps"], "offsets": z["offsets"], "black": _load(z["black"], dtype),
                    "pairs": _load(z["pairs"], dtype)}

    @staticmethod
    def clip_tokens(entry: dict[str, np.ndarray], indices: np.ndarray) -> np.ndarray:
        """Tokens [T, D] of the clip made of frames `indices`: (black, f_i0), (f_i0, f_i1), ..."""
        gaps = np.diff(indices)
        if np.any(gaps < 0) or np.any(gaps > entry["offsets"][-1]):
            raise ValueError(f"frame gaps {gaps.tolist()} outside the cached offsets 0..{entry['offsets'][-1]}")
        rest = entry["pairs"][indices[:-1], gaps]
        return np.concatenate([entry["black"][indices[:1]], rest], 0)

    def load_clip(self, video: int, num_frames: int, stride_range, rng: np.random.Generator) -> dict[str, np.ndarray]:
        from deltaworld_jax.data.sampling import sample_train_frame_indices

        entry = self.video(video)
        indices, times = sample_train_frame_indices(entry["timestamps"], num_frames, stride_range, rng)
        return {"tokens": self.clip_tokens(entry, indices).astype(np.float32), "timestamps": times,
                "frame_indices": indices}


class TokenIterator:
    """Process-local batches {"tokens" [B, T, D], "timestamps" [B, T]} from a token cache; deterministic in
    (seed, step), with get_state / set_state for the trainer's checkpoints. Clip j of global batch k is drawn
    from clip_rng(seed, k, j) over all videos, and process p reads clips [p*B, (p+1)*B) of it: global batch
    k does not depend on the process count, so a checkpoint resumes at global step k on any topology."""

    topology_independent = True

    def __init__(self, cache: TokenCache, *, num_frames: int, stride_range, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        self.cache, self.num_frames, self.stride_range = cache, num_frames, tuple(stride_range)
        self.batch_size, self.seed = batch_size, seed
        self.videos = np.arange(len(cache))
        if self.videos.size == 0:
            raise ValueError(f"token cache {cache.root} has no videos")
        self.first_clip = process_index * batch_size  # this process's first clip of every global batch
        self.position = 0

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        from deltaworld_jax.data.sampling import clip_rng

        clips = []
        for j in range(self.first_clip, self.first_clip + self.batch_size):
            rng = clip_rng(self.seed, self.position, j)
            video = int(self.videos[rng.integers(self.videos.size)])
            clip = self.cache.load_clip(video, self.num_frames, self.stride_range, rng)
            clips.append(clip)
        self.position += 1
        return {"tokens": np.stack([c["tokens"] for c in clips]),
                "timestamps": np.stack([c["timestamps"] for c in clips])}

    # The trainer checkpoints the data iterator with Grain's Orbax handler, which stores what get_state
    # returns as text (bytes for iterators that are not Grain DatasetIterators) and calls start_prefetch
    # after set_state on restore.
    def get_state(self) -> bytes:
        return json.dumps({"position": self.position}).encode()

    def set_state(self, state: bytes | str | dict) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        self.position = int(state["position"])

    def global_state(self, step: int, errors: dict | None = None) -> dict:
        del errors  # nothing is skipped: the cache holds only readable videos
        return {"position": int(step)}

    def start_prefetch(self) -> None:
        """Nothing to prefetch: a batch is a few small file reads."""


def token_data_fn(config, *, process_index: int, process_count: int) -> TokenIterator:
    """The trainer's data_fn when config.data.token_cache is set (trainer.default_data_fn picks it)."""
    batch = int(config.train.batch_size)
    if batch % process_count:
        raise ValueError(f"config.train.batch_size={batch} is not divisible by {process_count} processes")
    cache = TokenCache(config.data.token_cache)
    check_compatible(cache.index, config)
    return TokenIterator(cache, num_frames=int(config.data.num_frames),
                         stride_range=config.data.time_stride_range, batch_size=batch // process_count,
                         seed=int(config.data.get("seed", config.get("seed", 0))), process_index=process_index,
                         process_count=process_count)


def check_compatible(index: dict, config) -> None:
    """A cache serves a config when its frames have the config's size and its pair offsets cover every
    stride the config's sampler can draw; otherwise training would silently see other clips."""
    size = int(config.data.frame_size)
    if int(index["frame_size"]) != size:
        raise ValueError(f"token cache {config.data.token_cache!r} holds {index['frame_size']}px frames but "
                         f"config.data.frame_size={size}")
    low, high = (float(v) for v in config.data.time_stride_range)
    cached_low, cached_high = (float(v) for v in index["stride_range"])
    if low < cached_low - 1e-9 or high > cached_high + 1e-9:
        raise ValueError(f"token cache {config.data.token_cache!r} was written for strides {index['stride_range']} "
                         f"but config.data.time_stride_range={[low, high]} reaches beyond them")
