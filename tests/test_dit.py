"""LightningDiT: init, fixed tables, and the official-checkpoint importer.

The importer is checked on a state dict this test writes in the official layout and naming
(PyTorch shapes, random values everywhere, adaLN included), against a float64 NumPy forward
pass written here from the published formulas. Nothing here calls our key map to build the
expected values.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vtp_jax
from vtp_jax.checkpoints import lightningdit as ld
from vtp_jax.checkpoints.released import CheckpointError
from vtp_jax.models import dit, layers

# A tiny official-layout model: width 32 is in no size table, so heads come from the RoPE buffer.
SIZE, P, C, D, HEADS, DEPTH, CLASSES = 8, 2, 4, 32, 2, 1, 10
N = SIZE // P
DH = D // HEADS
HIDDEN = 85  # int(2/3 * int(4 * 32))


def np_sincos(n, width):
    """MAE's 2-D table, one token at a time: [sin, cos](col * w_k), then [sin, cos](row * w_k)."""
    omega = 10000.0 ** (-np.arange(width // 4) / (width / 4))
    out = np.zeros((n * n, width))
    for r in range(n):
        for c in range(n):
            out[r * n + c] = np.concatenate([np.sin(c * omega), np.cos(c * omega),
                                             np.sin(r * omega), np.cos(r * omega)])
    return out


def np_rope_angles(n, head_dim):
    """EVA's 2-D RoPE angles: dims [0, hd/2) use the row, [hd/2, hd) the column; pair (2i, 2i+1)
    shares frequency 10000^(-2i' / (hd/2)) with i' = i mod hd/4."""
    quarter = head_dim // 4
    freqs = 10000.0 ** (-2 * np.arange(quarter) / (head_dim / 2))
    out = np.zeros((n * n, head_dim))
    for r in range(n):
        for c in range(n):
            for j in range(head_dim):
                pos = r if j < head_dim // 2 else c
                out[r * n + c, j] = pos * freqs[(j % (head_dim // 2)) // 2]
    return out


def np_timestep(t, dim=256):
    f = np.exp(-math.log(10000) * np.arange(dim // 2) / (dim // 2))
    return np.concatenate([np.cos(t[:, None] * f), np.sin(t[:, None] * f)], axis=1)


def official_state_dict(seed=0, qk_norm=True):
    """Every tensor of a tiny LightningDiT in the official layout, random values."""
    rng = np.random.default_rng(seed)
    sd = {}

    def add(name, *shape, scale=0.1, offset=0.0):
        sd[name] = (offset + scale * rng.standard_normal(shape)).astype(np.float32)

    add("x_embedder.proj.weight", D, C, P, P, scale=0.3)
    add("x_embedder.proj.bias", D)
    sd["pos_embed"] = np_sincos(N, D)[None].astype(np.float32)
    add("t_embedder.mlp.0.weight", D, 256)
    add("t_embedder.mlp.0.bias", D)
    add("t_embedder.mlp.2.weight", D, D, scale=0.2)
    add("t_embedder.mlp.2.bias", D)
    add("y_embedder.embedding_table.weight", CLASSES + 1, D, scale=1.0)
    angles = np_rope_angles(N, DH)
    sd["feat_rope.freqs_cos"] = np.cos(angles).astype(np.float32)
    sd["feat_rope.freqs_sin"] = np.sin(angles).astype(np.float32)
    for i in range(DEPTH):
        b = f"blocks.{i}"
        add(f"{b}.norm1.weight", D, offset=1.0)
        add(f"{b}.norm2.weight", D, offset=1.0)
        add(f"{b}.attn.qkv.weight", 3 * D, D, scale=0.3)
        add(f"{b}.attn.qkv.bias", 3 * D)
        if qk_norm:
            add(f"{b}.attn.q_norm.weight", DH, offset=1.0)
            add(f"{b}.attn.k_norm.weight", DH, offset=1.0)
        add(f"{b}.attn.proj.weight", D, D, scale=0.2)
        add(f"{b}.attn.proj.bias", D)
        add(f"{b}.mlp.w12.weight", 2 * HIDDEN, D, scale=0.2)
        add(f"{b}.mlp.w12.bias", 2 * HIDDEN)
        add(f"{b}.mlp.w3.weight", D, HIDDEN, scale=0.2)
        add(f"{b}.mlp.w3.bias", D)
        add(f"{b}.adaLN_modulation.1.weight", 6 * D, D, scale=0.2)
        add(f"{b}.adaLN_modulation.1.bias", 6 * D)
    add("final_layer.norm_final.weight", D, offset=1.0)
    add("final_layer.linear.weight", P * P * C, D, scale=0.2)
    add("final_layer.linear.bias", P * P * C)
    add("final_layer.adaLN_modulation.1.weight", 2 * D, D, scale=0.2)
    add("final_layer.adaLN_modulation.1.bias", 2 * D)
    return sd


# ------------------------------------------------------------------------------------------
# Float64 NumPy forward of the official model (torch layouts read directly).
# ------------------------------------------------------------------------------------------
def silu(x):
    return x / (1 + np.exp(-x))


def rms(x, w):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * w


def linear(sd, name, x):
    return x @ sd[f"{name}.weight"].astype(np.float64).T + sd[f"{name}.bias"]


def rope_interleaved(x, cos, sin):
    """x (B, heads, N, hd): pairs (x_2i, x_2i+1) -> (x_2i cos - x_2i+1 sin, x_2i+1 cos + x_2i sin)."""
    rot = np.empty_like(x)
    rot[..., 0::2], rot[..., 1::2] = -x[..., 1::2], x[..., 0::2]
    return x * cos + rot * sin


def np_block(sd, b, x, c, qk_norm):
    mod = linear(sd, f"{b}.adaLN_modulation.1", silu(c))[:, None]
    shift1, scale1, gate1, shift2, scale2, gate2 = np.split(mod, 6, -1)
    h = rms(x, sd[f"{b}.norm1.weight"]) * (1 + scale1) + shift1
    bsz, n, _ = x.shape
    q, k, v = linear(sd, f"{b}.attn.qkv", h).reshape(bsz, n, 3, HEADS, DH).transpose(2, 0, 3, 1, 4)
    if qk_norm:
        q, k = rms(q, sd[f"{b}.attn.q_norm.weight"]), rms(k, sd[f"{b}.attn.k_norm.weight"])
    cos, sin = sd["feat_rope.freqs_cos"].astype(np.float64), sd["feat_rope.freqs_sin"].astype(np.float64)
    q, k = rope_interleaved(q, cos, sin), rope_interleaved(k, cos, sin)
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(DH)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    o = (attn @ v).transpose(0, 2, 1, 3).reshape(bsz, n, D)
    x = x + gate1 * linear(sd, f"{b}.attn.proj", o)
    h = rms(x, sd[f"{b}.norm2.weight"]) * (1 + scale2) + shift2
    x1, x2 = np.split(linear(sd, f"{b}.mlp.w12", h), 2, -1)
    return x + gate2 * linear(sd, f"{b}.mlp.w3", silu(x1) * x2)


def np_forward(sd, x, t, y, qk_norm=True):
    """x (B, H, W, C) NHWC -> velocity (B, H, W, C)."""
    bsz = x.shape[0]
    patches = x.reshape(bsz, N, P, N, P, C).transpose(0, 1, 3, 5, 2, 4).reshape(bsz, N * N, C * P * P)
    tokens = patches @ sd["x_embedder.proj.weight"].reshape(D, -1).T + sd["x_embedder.proj.bias"] + sd["pos_embed"][0]
    temb = linear(sd, "t_embedder.mlp.2", silu(linear(sd, "t_embedder.mlp.0", np_timestep(t))))
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    for i in range(DEPTH):
        tokens = np_block(sd, f"blocks.{i}", tokens, c, qk_norm)
    shift, scale = np.split(linear(sd, "final_layer.adaLN_modulation.1", silu(c))[:, None], 2, -1)
    out = linear(sd, "final_layer.linear", rms(tokens, sd["final_layer.norm_final.weight"]) * (1 + scale) + shift)
    return out.reshape(bsz, N, N, P, P, C).transpose(0, 1, 3, 2, 4, 5).reshape(bsz, SIZE, SIZE, C)


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# ------------------------------------------------------------------------------------------
# Init.
# ------------------------------------------------------------------------------------------
TINY = dit.LightningDiT(input_size=SIZE, patch_size=P, in_channels=C, hidden_size=D, depth=2, num_heads=HEADS,
                        num_classes=CLASSES)


@pytest.fixture(scope="module")
def init_params():
    return dit.init_params(TINY, jax.random.key(0))


def test_adaln_zero_is_identity_at_init(init_params):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, N * N, D)).astype(np.float32)
    c = rng.standard_normal((2, D)).astype(np.float32)
    rope = layers.interleaved_rope_tables(N, N, DH)
    block = jax.jit(dit.DiTBlock(HEADS, dit.swiglu_hidden(D)).apply)
    for i in range(TINY.depth):
        np.testing.assert_array_equal(np.asarray(block({"params": init_params[f"blocks_{i}"]}, x, c, rope)), x)
    latents = rng.standard_normal((3, SIZE, SIZE, C)).astype(np.float32)
    out = jax.jit(TINY.apply)({"params": init_params}, latents, jnp.array([0.0, 0.5, 1.0]), jnp.array([0, 3, CLASSES]))
    assert out.shape == latents.shape
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_init_distributions_and_axes(init_params):
    p = jax.tree.map(np.asarray, init_params)
    bound = lambda fan_in, fan_out: math.sqrt(6 / (fan_in + fan_out))  # noqa: E731
    # xavier-uniform over the official fused matrices: qkv (D, 3D), w12 (D, 2H), patch conv (C p p, D).
    for arr, b in ((p["blocks_0"]["attn"]["qkv"]["kernel"], bound(D, 3 * D)),
                   (p["blocks_0"]["attn"]["proj"]["kernel"], bound(D, D)),
                   (p["blocks_0"]["mlp"]["w1"]["kernel"], bound(D, 2 * HIDDEN)),
                   (p["blocks_1"]["mlp"]["w3"]["kernel"], bound(HIDDEN, D)),
                   (p["x_embedder"]["kernel"], bound(C * P * P, D))):
        assert 0.9 * b < np.abs(arr).max() <= b
    assert abs(p["y_embedder"]["embedding"].std() - 0.02) < 0.003
    assert abs(p["t_embedder"]["fc1"]["kernel"].std() - 0.02) < 0.002
    for name in ("adaLN_modulation", "linear"):
        np.testing.assert_array_equal(p["final_layer"][name]["kernel"], 0.0)
    assert p["y_embedder"]["embedding"].shape == (CLASSES + 1, D)
    # Every parameter carries logical axis names, one per dimension.
    boxed = jax.eval_shape(TINY.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, C)), jnp.zeros((1,)),
                           jnp.zeros((1,), jnp.int32))["params"]
    for path, leaf in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
        assert isinstance(leaf, nn.Partitioned), path
        assert len(leaf.names) == leaf.value.ndim, path
    assert dit.swiglu_hidden(768) == 2048 and dit.swiglu_hidden(1024) == 2730 and dit.swiglu_hidden(1152) == 3072


# ------------------------------------------------------------------------------------------
# Fixed tables.
# ------------------------------------------------------------------------------------------
def test_tables_match_published_formulas():
    np.testing.assert_allclose(dit.sincos_pos_embed(4, 4, 32), np_sincos(4, 32), atol=1e-6)
    t = np.array([0.0, 0.3, 1.0], np.float32)
    np.testing.assert_allclose(np.asarray(dit.timestep_embedding(jnp.asarray(t))), np_timestep(t.astype(np.float64)),
                               atol=1e-6)
    sin, cos = layers.interleaved_rope_tables(4, 4, 16)
    angles = np_rope_angles(4, 16)
    np.testing.assert_allclose(sin, np.sin(angles), atol=1e-6)
    np.testing.assert_allclose(cos, np.cos(angles), atol=1e-6)
    # The interleaved rotation itself, on (B, N, heads, hd).
    x = np.random.default_rng(1).standard_normal((1, 16, 2, 16)).astype(np.float32)
    got = layers.apply_rope(jnp.asarray(x), sin, cos, bf16=False, pairing="interleaved")
    want = rope_interleaved(x.transpose(0, 2, 1, 3).astype(np.float64), np.cos(angles), np.sin(angles))
    np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 1, 3), atol=1e-5)
    with pytest.raises(ValueError, match="pairing"):
        layers.apply_rope(jnp.asarray(x), sin, cos, bf16=False, pairing="adjacent")


# ------------------------------------------------------------------------------------------
# Importer.
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def official():
    return official_state_dict()


@pytest.fixture(scope="module")
def loaded(official):
    return vtp_jax.load_lightningdit(official)


def test_import_matches_numpy_forward(official, loaded):
    assert loaded.config == dict(input_size=SIZE, patch_size=P, in_channels=C, hidden_size=D, depth=DEPTH,
                                 num_heads=HEADS, mlp_ratio=4.0, num_classes=CLASSES, qk_norm=True, use_rope=True,
                                 learn_sigma=False)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, SIZE, SIZE, C)).astype(np.float32)
    t = np.array([0.0, 0.37, 1.0], np.float32)
    y = np.array([3, 0, CLASSES])  # the last one is the null class
    want = np_forward(official, x.astype(np.float64), t.astype(np.float64), y)
    assert rel_err(loaded.velocity(x, t, y), want) < 1e-4


def test_import_sample_with_guidance_matches_numpy(official, loaded):
    """Euler on the official grid (3 points, shift 0.3) with CFG from t >= 0.2 on all channels."""
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((2, SIZE, SIZE, C)).astype(np.float32)
    y = np.array([1, 7])
    scale, start = 2.5, 0.2
    grid = [0.3 * s / (1 - 0.7 * s) for s in (0.0, 0.5, 1.0)]
    x = noise.astype(np.float64)
    for t0, t1 in zip(grid[:-1], grid[1:]):
        tt = np.full(2, t0)
        cond = np_forward(official, x, tt, y)
        v = np_forward(official, x, tt, np.full(2, CLASSES)) * (1 - scale) + scale * cond if t0 >= start else cond
        x = x + (t1 - t0) * v
    got = loaded.sample(noise, y, num_steps=3, shift=0.3, cfg_scale=scale, cfg_interval_start=start)
    assert rel_err(got, x) < 1e-4


def test_label_dropout(official, loaded):
    """Training drops labels to the null class (rng 'label_dropout'); force_drop_ids drops exactly
    where it is 1, in training or not."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, SIZE, SIZE, C)).astype(np.float32)
    t, y = np.array([0.2, 0.6], np.float32), np.array([3, 5])
    null = np_forward(official, x.astype(np.float64), t.astype(np.float64), np.full(2, CLASSES))
    cond = np_forward(official, x.astype(np.float64), t.astype(np.float64), y)
    always = dit.LightningDiT(**{**loaded.config, "class_dropout_prob": 1.0})

    @jax.jit
    def run(params):
        dropped = always.apply({"params": params}, x, t, y, train=True, rngs={"label_dropout": jax.random.key(0)})
        forced = loaded.model.apply({"params": params}, x, t, y, force_drop_ids=np.array([1, 0]))
        return dropped, forced

    dropped, forced = run(loaded.params)
    assert rel_err(dropped, null) < 1e-4
    assert rel_err(forced[0], null[0]) < 1e-4 and rel_err(forced[1], cond[1]) < 1e-4


def test_import_errors_name_every_bad_key(official):
    sd = dict(official)
    del sd["blocks.0.attn.proj.bias"]
    sd["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    sd["blocks.0.mlp.w3.weight"] = sd["blocks.0.mlp.w3.weight"].T
    sd["pos_embed"] = sd["pos_embed"] + 0.5
    with pytest.raises(CheckpointError) as e:
        ld.from_state_dict(sd)
    msg = str(e.value)
    for k in ("missing key: blocks.0.attn.proj.bias", "unexpected key: blocks.0.attn.extra",
              f"blocks.0.mlp.w3.weight: shape ({HIDDEN}, {D}), expected ({D}, {HIDDEN})", "pos_embed: differs"):
        assert k in msg, msg
    # Without RoPE tables the head count comes from the size table or the argument.
    no_rope = {k: v for k, v in official.items() if not k.startswith("feat_rope")}
    with pytest.raises(CheckpointError, match="width 32 .* pass num_heads"):
        ld.infer_hparams(no_rope)
    assert ld.infer_hparams(no_rope, num_heads=4)["num_heads"] == 4
    with pytest.raises(CheckpointError, match=r"feat_rope.freqs_cos: shape \(16, 16\), expected \(16, 8\)"):
        ld.from_state_dict(official, num_heads=4)  # its tables are those of 2 heads


def test_export_round_trip_and_ddp_prefix(official):
    hp, params = ld.from_state_dict({"module." + k: v for k, v in official.items()})
    back = ld.to_state_dict(hp, params)
    assert sorted(back) == sorted(official)
    for k, v in official.items():
        np.testing.assert_array_equal(back[k].shape, v.shape)
        np.testing.assert_allclose(back[k], v, rtol=0, atol=1e-6 if k in ld.buffers(hp) else 0, err_msg=k)
