"""DeltaTok: numerical parity with the official PyTorch computation, training, rollout and the ablation.

The official module tree is rebuilt here in torch: transformers' DINOv3ViTLayer from a tiny DINOv3ViTConfig,
the official QK-norm / gated-attention forward (as models/qk_norm.py and models/gated_attn.py patch it),
and DeltaTok.encode / decode / tokenize_offline. All parameters are randomised (LayerScale included, so the
blocks matter), exported under the official names and imported with `load_deltatok`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deltaworld_jax.models import basic_layers
from deltaworld_jax.models.deltatok import DeltaTok, DeltaTokConfig
from deltaworld_jax.models.dinov3 import DINOv3, DINOv3Config, PixelPatchVFM
from deltaworld_jax.pretrained.deltatok import load_deltatok
from deltaworld_jax.tasks import deltatok as deltatok_task

torch = pytest.importorskip("torch")
transformers_dinov3 = pytest.importorskip("transformers.models.dinov3_vit.modeling_dinov3_vit")

HIDDEN, HEADS, DEPTH, GRID = 32, 2, 2, (2, 3)
TEMPLATE_MLP = 96  # SwiGLU -> 2 * 96 // 3 = 64, as the official code derives it from the template
RTOL = 1e-5


# ----------------------------------------------------------------------------------------------------
# The official computation, in torch
# ----------------------------------------------------------------------------------------------------


def _official_attention_forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kw):
    """The forward the official patches install (qk_norm.py, then gated_attn.py on top of it)."""
    b, l, _ = hidden_states.shape
    q, k, v = (proj(hidden_states).view(b, l, self.num_heads, self.head_dim).transpose(1, 2)
               for proj in (self.q_proj, self.k_proj, self.v_proj))
    if position_embeddings is not None:
        q, k = transformers_dinov3.apply_rotary_pos_emb(q, k, *position_embeddings)
    if hasattr(self, "q_norm"):  # QK-norm AFTER RoPE
        q, k = self.q_norm(q), self.k_norm(k)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=self.scaling)
    if hasattr(self, "attn_gate"):  # per-head sigmoid gate from the attention's input
        out = out * self.attn_gate(hidden_states).transpose(1, 2).unsqueeze(-1).sigmoid()
    return self.o_proj(out.transpose(1, 2).reshape(b, l, -1)), None


class OfficialDeltaTok(torch.nn.Module):
    def __init__(self, *, use_delta=True, use_qk_norm=True, use_gated_attn=True, use_swiglu=True):
        super().__init__()
        from types import MethodType

        cfg = transformers_dinov3.DINOv3ViTConfig(
            hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=TEMPLATE_MLP, patch_size=16,
            layer_norm_eps=1e-5, query_bias=True, key_bias=False, value_bias=True, proj_bias=True,
            mlp_bias=True, rope_theta=100.0, layerscale_value=1.0, drop_path_rate=0.0)
        cfg._attn_implementation = "sdpa"
        if use_swiglu:
            cfg.use_gated_mlp = True
            cfg.intermediate_size = max(1, (2 * int(cfg.intermediate_size)) // 3)
            cfg.hidden_act = "silu"
        self.cfg = cfg
        self.use_delta = use_delta
        self.z_embed = torch.nn.Embedding(1, HIDDEN)
        self.xy_embed = torch.nn.Embedding(2, HIDDEN)
        self.encoder_blocks = torch.nn.ModuleList([transformers_dinov3.DINOv3ViTLayer(cfg) for _ in range(DEPTH)])
        self.decoder_blocks = torch.nn.ModuleList([transformers_dinov3.DINOv3ViTLayer(cfg) for _ in range(DEPTH)])
        for blk in [*self.encoder_blocks, *self.decoder_blocks]:
            attn = blk.attention
            if use_qk_norm:
                attn.q_norm = torch.nn.LayerNorm(attn.head_dim, eps=1e-5, bias=False)
                attn.k_norm = torch.nn.LayerNorm(attn.head_dim, eps=1e-5, bias=False)
            if use_gated_attn:
                attn.attn_gate = torch.nn.Linear(HIDDEN, attn.num_heads, bias=True)
            if use_qk_norm or use_gated_attn:
                attn.forward = MethodType(_official_attention_forward, attn)
        self.norm = torch.nn.LayerNorm(HIDDEN, 1e-5)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # random everything, LayerScale included, so every block contributes
            for name, p in self.named_parameters():
                if name.endswith("lambda1") or name.endswith("norm.weight") or "norm1" in name or "norm2" in name:
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))

    def encode(self, x, y, rope):
        z = self.z_embed.weight[None].repeat(y.shape[0], 1, 1)
        if self.use_delta:
            hidden = torch.cat((z, x + self.xy_embed.weight[0], y + self.xy_embed.weight[1]), 1)
            rope = (torch.cat((rope[0], rope[0]), -2), torch.cat((rope[1], rope[1]), -2))
        else:
            hidden = torch.cat((z, y + self.xy_embed.weight[1]), 1)
        for blk in self.encoder_blocks:
            hidden = blk(hidden, position_embeddings=rope)
        return self.norm(hidden[:, :1])

    def decode(self, z, x, rope):
        if not self.use_delta:
            x = self.xy_embed.weight[0][None, None].expand_as(x)
        hidden = torch.cat((z, x), 1)
        for blk in self.decoder_blocks:
            hidden = blk(hidden, position_embeddings=rope)
        return hidden[:, 1:]

    def tokenize_offline(self, x, y, rope):
        x = torch.cat((x.unsqueeze(1), y[:, :-1]), 1)
        return self.encode(x.flatten(0, 1), y.flatten(0, 1), rope).unflatten(0, (y.shape[0], -1))


def _state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _to_torch(x):
    return torch.from_numpy(np.array(x, np.float32))  # a copy: a jax array's numpy view is read-only


# ----------------------------------------------------------------------------------------------------
# (a), (f): parity
# ----------------------------------------------------------------------------------------------------


def test_rope_table_matches_transformers_in_eval_mode():
    official = OfficialDeltaTok()
    rope_module = transformers_dinov3.DINOv3ViTRopePositionEmbedding(official.cfg).eval()
    cos_t, sin_t = rope_module(torch.zeros(1, 3, GRID[0] * 16, GRID[1] * 16))
    model = load_deltatok(_state_dict_numpy(official))
    cos, sin = model.rope(GRID)
    np.testing.assert_allclose(cos, cos_t.numpy(), atol=1e-6)
    np.testing.assert_allclose(sin, sin_t.numpy(), atol=1e-6)
    # With an rng the table is augmented (DINOv3's rescale); without one it never is.
    cos_aug, _ = model.rope(GRID, jax.random.key(3))
    assert not np.allclose(cos_aug, cos)
    no_aug = load_deltatok(_state_dict_numpy(official), use_rope_aug=False)
    np.testing.assert_array_equal(no_aug.rope(GRID, jax.random.key(3))[0], cos)


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(use_delta=False),
        dict(use_qk_norm=False, use_gated_attn=False, use_swiglu=False),
        dict(use_qk_norm=True, use_gated_attn=False),
    ],
    ids=["released", "no_delta", "plain_blocks", "qk_norm_only"],
)
def test_parity_with_official_encode_decode_tokenize(variant):
    official = OfficialDeltaTok(**variant).eval()
    model = load_deltatok(_state_dict_numpy(official), use_delta=variant.get("use_delta", True), num_heads=HEADS)
    assert model.cfg.num_heads == HEADS and model.cfg.num_layers == DEPTH
    rng = np.random.default_rng(0)
    b, t, n = 2, 3, GRID[0] * GRID[1]
    feats = rng.normal(size=(b, t, n, HIDDEN)).astype(np.float32)
    black = rng.normal(size=(b, n, HIDDEN)).astype(np.float32)

    @jax.jit
    def run(feats, black, cos, sin):
        z = model.encode(feats[:, 0], feats[:, 1], (cos, sin))
        return z, model.decode(z, feats[:, 0], (cos, sin)), model.tokenize_clip(feats, black, (cos, sin))

    for rope in (model.rope(GRID), model.rope(GRID, jax.random.key(7))):  # eval table, augmented table
        rope_t = (_to_torch(rope[0]), _to_torch(rope[1]))
        with torch.no_grad():
            z_t = official.encode(_to_torch(feats[:, 0]), _to_torch(feats[:, 1]), rope_t)
            y_t = official.decode(z_t, _to_torch(feats[:, 0]), rope_t)
            tokens_t = official.tokenize_offline(_to_torch(black), _to_torch(feats), rope_t)
        z, y_hat, tokens = run(feats, black, *rope)
        assert z.shape == (b, 1, HIDDEN) and y_hat.shape == (b, n, HIDDEN) and tokens.shape == (b, t, HIDDEN)
        assert _rel_err(z, z_t.numpy()) <= RTOL
        assert _rel_err(y_hat, y_t.numpy()) <= RTOL
        assert _rel_err(tokens, tokens_t[:, :, 0].numpy()) <= RTOL
        # The decoder must actually change x (random LayerScale): parity is not a trivial identity.
        assert _rel_err(y_hat, feats[:, 0]) > 0.05
    if not model.cfg.use_delta:
        # The ablation ignores x's values: encode sees only y, decode starts from the learned x role vector.
        other = feats.copy()
        other[:, 0] = rng.normal(size=(b, n, HIDDEN))
        z_other, y_other, _ = run(other, black, *rope)
        np.testing.assert_array_equal(z_other, z)
        np.testing.assert_array_equal(y_other, y_hat)


# ----------------------------------------------------------------------------------------------------
# (e) rollout
# ----------------------------------------------------------------------------------------------------


def _tiny_model(seed=0, **kw) -> DeltaTok:
    cfg = DeltaTokConfig(hidden_size=HIDDEN, num_layers=1, num_heads=HEADS, intermediate_size=64, **kw)
    model = DeltaTok(cfg, rngs=nnx.Rngs(seed))
    # Non-trivial LayerScale so a rollout step is distinguishable from copying x.
    for _, ls in nnx.iter_graph(model):
        if isinstance(ls, basic_layers.LayerScale):
            ls.lambda1[...] = jnp.full_like(ls.lambda1[...], 0.5)
    return model


def test_rollout_matches_step_by_step_reconstruction():
    model = _tiny_model()
    b, t, n = 2, 4, GRID[0] * GRID[1]
    feats = jax.random.normal(jax.random.key(1), (b, t, n, HIDDEN))
    black = jax.random.normal(jax.random.key(2), (1, n, HIDDEN))
    rope = model.rope(GRID)
    rollout = jax.jit(lambda f, k, h: model.rollout(f, k, h, rope), static_argnums=2)

    # horizon == T: no context, step 0 starts from the black frame's features.
    preds, targets = rollout(feats, black, t)
    assert preds.shape == targets.shape == (b, t, n, HIDDEN)
    np.testing.assert_array_equal(targets, feats)
    one_step = jax.jit(lambda x, y: model.decode(model.encode(x, y, rope), x, rope))
    np.testing.assert_allclose(preds[:, 0], one_step(jnp.broadcast_to(black, (b, n, HIDDEN)), feats[:, 0]),
                               rtol=1e-5, atol=1e-5)

    # horizon < T: start from the frame before the horizon; each reconstruction becomes the next x.
    h = 2
    preds, targets = rollout(feats, black, h)
    assert preds.shape == (b, h, n, HIDDEN)
    np.testing.assert_array_equal(targets, feats[:, t - h:])
    x = feats[:, t - h - 1]
    for i in range(h):
        x = one_step(x, feats[:, t - h + i])
        np.testing.assert_allclose(preds[:, i], x, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="horizon"):
        model.rollout(feats, black, t + 1, rope)


def test_bad_inputs_name_the_problem():
    model = _tiny_model()
    rope = model.rope(GRID)
    with pytest.raises(ValueError, match="patches"):
        model.encode(jnp.zeros((1, 5, HIDDEN)), jnp.zeros((1, 5, HIDDEN)), rope)
    with pytest.raises(ValueError, match="features"):
        model.decode(jnp.zeros((1, 1, HIDDEN)), jnp.zeros((1, 6, HIDDEN + 1)), rope)
    with pytest.raises(ValueError, match="divisible"):
        DeltaTokConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="T>=2"):
        deltatok_task.reconstruction_loss(model, PixelPatchVFM(8), jnp.zeros((1, 1, 16, 16, 3)), None)


def test_bf16_compute_keeps_a_float32_residual_stream_and_outputs():
    cfg = DeltaTokConfig(hidden_size=HIDDEN, num_layers=1, num_heads=HEADS, intermediate_size=64,
                         layer_scale_init=0.5)
    f32, bf16 = DeltaTok(cfg, rngs=nnx.Rngs(0)), DeltaTok(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.float32)}
    feats = jax.random.normal(jax.random.key(1), (2, 2, GRID[0] * GRID[1], HIDDEN))
    rope = f32.rope(GRID)
    outs = {}
    for name, model in (("f32", f32), ("bf16", bf16)):
        @jax.jit
        def run(feats):
            z = model.encode(feats[:, 0], feats[:, 1], rope)
            return z, model.decode(z, feats[:, 0], rope)

        outs[name] = run(feats)
    for a, b in zip(outs["bf16"], outs["f32"]):
        assert a.dtype == jnp.float32  # as the official autocast: float32 LayerNorm output and residual adds
        assert 0 < _rel_err(a, b) < 2e-2


# ----------------------------------------------------------------------------------------------------
# (b), (c), (d) training
# ----------------------------------------------------------------------------------------------------


def _tiny_vfm():
    """A tiny random DINOv3 (patch 8, width 32): the frozen VFM of the training tests."""
    cfg = DINOv3Config(patch_size=8, hidden_size=HIDDEN, num_layers=1, num_heads=HEADS, intermediate_size=64)
    return DINOv3(cfg, rngs=nnx.Rngs(1))


def _task():
    import ml_collections

    config = ml_collections.ConfigDict(dict(
        model=dict(kind="deltatok", hidden_size=HIDDEN, num_heads=HEADS, num_layers=1, intermediate_size=64),
        vfm=dict(kind="pixel", patch_size=8, num_heads=HEADS),
    ))
    from deltaworld_jax.tasks import make_task

    return make_task(config)


def test_training_lowers_the_loss_traces_once_and_never_touches_the_vfm(monkeypatch):
    task = _task()
    assert isinstance(task, deltatok_task.DeltaTokTask)
    model = task.build_trainable(nnx.Rngs(0))
    vfm = _tiny_vfm()

    # (c) the trainable state is DeltaTok alone.
    graphdef, params = nnx.split(model, nnx.Param)
    top_level = {path[0] for path, _ in nnx.to_flat_state(params)}
    assert top_level == {"encoder_blocks", "decoder_blocks", "z_embed", "xy_embed", "norm"}
    assert basic_layers.count_params(model) == sum(x.size for x in jax.tree.leaves(params))
    vfm_graphdef, vfm_state = nnx.split(vfm)
    vfm_before = jax.tree.map(np.asarray, vfm_state)

    mask = jax.tree.map(lambda _: False, nnx.to_pure_dict(params))
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear):
            sub = mask
            for p in path:
                sub = sub[p]
            sub["kernel"] = True
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.01, mask=mask))
    pure = nnx.to_pure_dict(params)
    opt_state = tx.init(pure)
    traces = []

    @jax.jit
    def step(pure, opt_state, vfm_state, batch, rng):
        traces.append(1)

        def loss_fn(p):
            state = nnx.State(params)
            nnx.replace_by_pure_dict(state, p)
            trainable = nnx.merge(graphdef, state)
            frozen = nnx.merge(vfm_graphdef, jax.lax.stop_gradient(vfm_state))
            return task.loss(trainable, frozen, batch, rng)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(pure)
        updates, opt_state = tx.update(grads, opt_state, pure)
        return optax.apply_updates(pure, updates), opt_state, metrics

    frames = jax.random.randint(jax.random.key(5), (2, 2, 16, 24, 3), 0, 256, dtype=jnp.int32).astype(jnp.uint8)
    batch = {"frames": frames, "timestamps": jnp.zeros((2, 2), jnp.float32)}
    # The step's rng reaches DeltaTok's RoPE (whose augmentation test_rope_table_* checks); traced only.
    rope_rngs = []
    original_rope = DeltaTok.rope
    monkeypatch.setattr(DeltaTok, "rope", lambda self, grid, rng=None: (rope_rngs.append(rng),
                                                                         original_rope(self, grid, rng))[1])
    jax.eval_shape(lambda rng: task.loss(model, vfm, batch, rng), jax.random.key(0))
    assert len(rope_rngs) == 1 and rope_rngs[0] is not None
    monkeypatch.undo()
    losses = []
    for i in range(12):
        pure, opt_state, metrics = step(pure, opt_state, vfm_state, batch, jax.random.key(100 + i))
        losses.append(float(metrics["loss"]))
        assert np.isfinite(losses[-1]) and set(metrics) >= {"loss", "rel_error", "copy_last_loss"}
    assert len(traces) == 1  # (d) one trace for all steps
    assert losses[-1] < 0.97 * losses[0] and losses[-1] < losses[-2], losses  # (b)
    jax.tree.map(np.testing.assert_array_equal, vfm_before, jax.tree.map(np.asarray, vfm_state))


def test_config_defaults_follow_the_official_template():
    cfg = deltatok_task.deltatok_config_from({"kind": "deltatok", "num_layers": 1}, (384, 6))
    # Width and heads come from the VFM; the MLP width from the ViT-B template (2*3072//3), as officially.
    assert (cfg.hidden_size, cfg.num_heads, cfg.intermediate_size) == (384, 6, 2048)
    cfg = deltatok_task.deltatok_config_from({"use_swiglu": False, "hidden_size": 64, "num_heads": 4})
    assert cfg.intermediate_size == 3072
    with pytest.raises(ValueError, match="num_heads"):
        deltatok_task.deltatok_config_from({"hidden_size": 64})


def test_task_takes_width_and_heads_from_the_vfm_config():
    import ml_collections

    from deltaworld_jax.tasks import make_task

    task = make_task(ml_collections.ConfigDict(dict(
        model=dict(kind="deltatok", num_layers=1), vfm=dict(kind="pixel", patch_size=4, num_heads=3))))
    abstract = nnx.eval_shape(lambda: task.build_trainable(nnx.Rngs(0)))
    assert (abstract.cfg.hidden_size, abstract.cfg.num_heads, abstract.cfg.intermediate_size) == (48, 3, 2048)
    assert isinstance(task.build_frozen(), PixelPatchVFM)
