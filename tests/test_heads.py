"""Task heads: parity with torch transcriptions of the official heads (official state-dict names), strict
loading, and the torch-bicubic position-table resize."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F

import deltaworld_jax  # noqa: F401
from deltaworld_jax.models import heads
from deltaworld_jax.pretrained.heads import load_head


# -- torch transcriptions of the official heads (models/task_heads.py), used as ground truth ----------------


class TorchSeg(tnn.Module):
    def __init__(self, d, c):
        super().__init__()
        self.bn, self.head = tnn.BatchNorm2d(d), tnn.Conv2d(d, c, 1)

    def forward(self, x):
        return self.head(self.bn(x))


class TorchDepth(TorchSeg):
    def forward(self, x):
        logits = torch.relu(self.head(self.bn(x))) + 0.1
        logits = logits / logits.sum(1, True)
        bins = torch.linspace(1e-3, 80.0, self.head.out_channels)
        return torch.einsum("bkmn,k->bmn", logits, bins)


class TorchAttn(tnn.Module):
    def __init__(self, d, nh):
        super().__init__()
        self.nh = nh
        self.query, self.key, self.value = tnn.Linear(d, d), tnn.Linear(d, d), tnn.Linear(d, d)

    def forward(self, x):
        b, l, d = x.shape
        sp = lambda t: t.view(b, l, self.nh, d // self.nh).transpose(1, 2)
        q, k, v = sp(self.query(x)), sp(self.key(x)), sp(self.value(x))
        a = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.nh)
        return (a.softmax(-1) @ v).transpose(1, 2).reshape(b, l, d)


class TorchBlock(tnn.Module):
    def __init__(self, d, nh, m):
        super().__init__()
        self.attention = tnn.ModuleDict({"attention": TorchAttn(d, nh),
                                         "output": tnn.ModuleDict({"dense": tnn.Linear(d, d)})})
        self.layernorm_before, self.layernorm_after = tnn.LayerNorm(d, eps=1e-12), tnn.LayerNorm(d, eps=1e-12)
        self.intermediate = tnn.ModuleDict({"dense": tnn.Linear(d, m)})
        self.output = tnn.ModuleDict({"dense": tnn.Linear(m, d)})

    def forward(self, x):
        x = x + self.attention["output"]["dense"](self.attention["attention"](self.layernorm_before(x)))
        return self.output["dense"](F.gelu(self.intermediate["dense"](self.layernorm_after(x)))) + x


class TorchRGB(tnn.Module):
    def __init__(self, din, nw, nb, d, depth, nh, m, p, img):
        super().__init__()
        self.p, self.nw, self.nb = p, nw, nb
        self.decoder_embed = tnn.Linear(din, d)
        self.trainable_cls_token = tnn.Parameter(torch.randn(1, 1, d))
        table = torch.from_numpy(heads.sincos_pos_embed(d, img // p))
        self.decoder_pos_embed = tnn.Parameter(table, requires_grad=False)
        self.decoder_layers = tnn.ModuleList([TorchBlock(d, nh, m) for _ in range(depth)])
        self.decoder_norm = tnn.LayerNorm(d, eps=1e-12)
        self.decoder_pred = tnn.Linear(d, p * p * 3)

    def forward(self, x):
        b, _, h, w = x.shape
        x = (x.flatten(2).transpose(1, 2) - self.nb) / self.nw
        x = torch.cat([self.trainable_cls_token.expand(b, -1, -1), self.decoder_embed(x)], 1)
        pe = self.decoder_pos_embed
        g = int((pe.shape[1] - 1) ** 0.5)
        if (g, g) != (h, w):
            pp = F.interpolate(pe[:, 1:].view(1, g, g, -1).permute(0, 3, 1, 2), (h, w), mode="bicubic")
            pe = torch.cat([pe[:, :1], pp.permute(0, 2, 3, 1).flatten(1, 2)], 1)
        x = x + pe
        for blk in self.decoder_layers:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        x = x.view(b, h, w, self.p, self.p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, h * self.p, w * self.p)
        mean = torch.tensor(heads.IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(heads.IMAGENET_STD).view(1, 3, 1, 1)
        return x * std + mean


def _randomise(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.dtype.is_floating_point or "pos_embed" in name:
                continue  # the position table stays the fixed sincos one, as in the release
            noise = torch.randn_like(t) * 0.3
            t.copy_(noise.abs() + 0.5 if name.endswith("running_var") else noise)
    return module.eval()


def _save(module, path):
    torch.save(module.state_dict(), path)  # includes bn.num_batches_tracked, as official checkpoints do
    return path


def _close(ours, ref, tol=1e-5):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    scale = max(np.abs(ref).max(), 1e-6)
    assert np.abs(ours - ref).max() <= tol * scale, np.abs(ours - ref).max() / scale


@pytest.mark.parametrize("kind,classes", [("seg-head-vspw", 124), ("seg-head-cityscapes", 19)])
def test_seg_head_matches_official(tmp_path, kind, classes):
    ref = _randomise(TorchSeg(32, classes))
    head = load_head(_save(ref, tmp_path / "seg.pth"), kind)
    np.testing.assert_array_equal(np.asarray(head.head.kernel[...]), ref.head.weight[:, :, 0, 0].T.detach().numpy())
    np.testing.assert_array_equal(np.asarray(head.bn.running_var[...]), ref.bn.running_var.numpy())
    x = np.random.default_rng(0).normal(size=(2, 32, 3, 5)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).permute(0, 2, 3, 1).numpy()
    _close(head(jnp.asarray(x.transpose(0, 2, 3, 1))), expected)
    # [B, N, D] token layout gives the same logits per token.
    tokens = head(jnp.asarray(x.transpose(0, 2, 3, 1).reshape(2, 15, 32)))
    _close(tokens.reshape(2, 3, 5, classes), expected)


def test_depth_head_matches_official(tmp_path):
    ref = _randomise(TorchDepth(32, 256))
    head = load_head(_save(ref, tmp_path / "depth.bin"), "depth-head-kitti")
    assert (head.min_depth, head.max_depth, head.num_bins) == (1e-3, 80.0, 256)
    x = np.random.default_rng(1).normal(size=(2, 32, 4, 4)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    out = head(jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert out.shape == (2, 4, 4)
    _close(out, expected)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])  # the stored 4x4 table, and a bicubic resize
def test_rgb_head_matches_official(tmp_path, grid):
    din = 24
    rng = np.random.default_rng(2)
    nw, nb = rng.uniform(0.5, 2, din).astype(np.float32), rng.normal(size=din).astype(np.float32)
    ref = _randomise(TorchRGB(din, torch.from_numpy(nw), torch.from_numpy(nb), 32, 2, 4, 48, 4, 16))
    head = load_head(_save(ref, tmp_path / "rgb.pth"), "rgb-head-imagenet", norm_weight=nw, norm_bias=nb, num_heads=4)
    assert len(head.decoder_layers) == 2 and head.patch_size == 4
    np.testing.assert_array_equal(np.asarray(head.decoder_layers[1].attention.attention.value.kernel[...]),
                                  ref.decoder_layers[1].attention["attention"].value.weight.T.detach().numpy())
    h, w = grid
    x = rng.normal(size=(2, din, h, w)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).permute(0, 2, 3, 1).numpy()
    out = head(jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert out.shape == (2, h * 4, w * 4, 3)
    _close(out, expected)


def test_torch_bicubic_matrix_matches_torch_interpolate():
    x = np.random.default_rng(3).normal(size=(1, 2, 6, 6)).astype(np.float32)
    for out_hw in [(9, 4), (6, 6), (3, 11)]:
        expected = F.interpolate(torch.from_numpy(x), out_hw, mode="bicubic").numpy()
        rows, cols = heads.torch_bicubic_matrix(6, out_hw[0]), heads.torch_bicubic_matrix(6, out_hw[1])
        ours = np.einsum("hy,ncyx,wx->nchw", rows, x, cols)
        _close(ours, expected)


def test_strict_loading_reports_all_problems(tmp_path):
    sd = _randomise(TorchSeg(16, 19)).state_dict()
    sd["extra.weight"] = torch.zeros(3)
    del sd["bn.bias"]
    sd["bn.running_mean"] = torch.zeros(15)
    with pytest.raises(ValueError) as err:
        load_head(sd, "seg-head-cityscapes")
    msg = str(err.value)
    assert "bn.bias" in msg and "extra.weight" in msg and "bn.running_mean" in msg
    with pytest.raises(ValueError, match="expects 124 classes"):
        load_head(_randomise(TorchSeg(16, 19)).state_dict(), "seg-head-vspw")
    with pytest.raises(ValueError, match="Unknown head kind"):
        load_head({}, "seg-head-ade")
    with pytest.raises(FileNotFoundError):
        load_head(tmp_path / "absent.pth", "depth-head-kitti")
    rgb = TorchRGB(8, torch.ones(8), torch.zeros(8), 16, 1, 2, 16, 2, 8).state_dict()
    with pytest.raises(ValueError, match="norm_weight"):
        load_head(rgb, "rgb-head-imagenet")


def test_heads_reject_wrong_width():
    from flax import nnx

    seg = heads.SegHead(8, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="8 channels"):
        seg(jnp.zeros((1, 2, 2, 7)))
