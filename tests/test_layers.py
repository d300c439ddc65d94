"""The shared layers (RoPE, Attention, Mlp, Block) against NumPy re-derivations.

Every expected value comes from float64 NumPy (or an op-by-op bfloat16 emulation with
ml_dtypes) written here from the formulas in released_vtp.md and DINOv2's batch-subset drop
path; the layers under test only supply their parameters.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from scipy.special import erf

from vtp_jax.models.layers import (
    Attention, Block, Mlp, apply_rope, l2_normalize, mlp_hidden, norm_layer, remat_block, rope_tables)

BF16 = ml_dtypes.bfloat16
F32 = np.float32


# ----------------------------------------------------------------------------------------------
# NumPy references.
# ----------------------------------------------------------------------------------------------
def ref_rope_angles(h, w, head_dim, base=100.0):
    """float64 angles (h*w, head_dim/2): per token all row-axis frequencies, then column-axis."""
    periods = base ** (2 * np.arange(head_dim // 4) / (head_dim / 2))
    rows = (np.arange(0.5, h) / h) * 2 - 1
    cols = (np.arange(0.5, w) / w) * 2 - 1
    angles = np.empty((h * w, head_dim // 2))
    for y in range(h):
        for x in range(w):
            angles[y * w + x, : head_dim // 4] = 2 * np.pi * rows[y] / periods
            angles[y * w + x, head_dim // 4:] = 2 * np.pi * cols[x] / periods
    return angles


def ref_rope_tables_f64(h, w, head_dim, base=100.0):
    a = np.tile(ref_rope_angles(h, w, head_dim, base), (1, 2))
    return np.sin(a), np.cos(a)


def _bf(x):
    """Round float32 values to bfloat16 (to nearest even), as a bf16 array."""
    return np.asarray(x, F32).astype(BF16)


def _f(x):
    return np.asarray(x).astype(F32)


def ref_rope_tables_bf16(h, w, head_dim, base=100.0):
    """The release's RoPE chain on bf16 tensors: each PyTorch op computes in float32 and rounds."""
    arange = np.arange(head_dim // 4).astype(BF16)
    exponent = _bf(_f(_bf(2 * _f(arange))) / F32(head_dim // 2))
    periods = _bf(np.power(F32(base), _f(exponent)))
    rows = _bf(_f(_bf(np.arange(h) + 0.5)) / F32(h))
    cols = _bf(_f(_bf(np.arange(w) + 0.5)) / F32(w))
    grid = np.stack(np.meshgrid(_f(rows), _f(cols), indexing="ij"), -1).reshape(h * w, 2)
    coords = _bf(_f(_bf(F32(2.0) * grid)) - F32(1.0))
    angles = _bf(_f(_bf(F32(2 * math.pi) * _f(coords)[:, :, None])) / _f(periods)[None, None, :])
    angles = np.concatenate([angles.reshape(h * w, -1)] * 2, axis=-1)
    return _f(np.sin(angles)), _f(np.cos(angles))  # ml_dtypes: sin in float32, rounded to bf16


def ref_rotate(x, angles):
    """Rotates pair (i, i + dh/2) by angles[:, i] as a complex product; x (B, N, H, dh)."""
    half = x.shape[-1] // 2
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angles)[None, :, None, :]
    return np.concatenate([z.real, z.imag], axis=-1)


def ref_rms(x, scale, eps=1e-5):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def ref_layernorm(x, scale, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def ref_attention(x, p, *, causal=False, qk_norm=False, angles=None):
    """Softmax attention with the fused qkv kernel (D, 3, H, dh) and out kernel (H, dh, D)."""
    qkv = np.einsum("bnd,dthk->bnthk", x, p["qkv"]["kernel"]) + p["qkv"]["bias"]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if qk_norm:
        q, k = ref_rms(q, p["q_norm"]["scale"]), ref_rms(k, p["k_norm"]["scale"])
    if angles is not None:  # rotate the trailing tokens only
        n = angles.shape[0]
        q = np.concatenate([q[:, :-n], ref_rotate(q[:, -n:], angles)], 1)
        k = np.concatenate([k[:, :-n], ref_rotate(k[:, -n:], angles)], 1)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", a, v)
    return np.einsum("bqhd,hdo->bqo", o, p["proj"]["kernel"]) + p["proj"]["bias"]


def ref_mlp(x, p, kind):
    def lin(y, name):
        return y @ p[name]["kernel"] + p[name]["bias"]

    if kind == "swiglu":
        a = lin(x, "w1")
        return lin(a / (1 + np.exp(-a)) * lin(x, "w2"), "w3")
    a = lin(x, "fc1")
    return lin(0.5 * a * (1 + erf(a / np.sqrt(2))), "fc2")


def ref_block(x, p, *, mlp, norm, eps, qk_norm=False, layerscale=False, causal=False, angles=None):
    def n(y, name):
        if norm == "rmsnorm":
            return ref_rms(y, p[name]["scale"], eps)
        return ref_layernorm(y, p[name]["scale"], p[name]["bias"], eps)

    a = ref_attention(n(x, "norm1"), p["attn"], causal=causal, qk_norm=qk_norm, angles=angles)
    x = x + (a * p["ls1"] if layerscale else a)
    m = ref_mlp(n(x, "norm2"), p["mlp"], mlp)
    return x + (m * p["ls2"] if layerscale else m)


def random_params(module, x, *args, seed=0, scale=0.25):
    """The module's parameter tree filled with random values (biases and norm scales included,
    so that a dropped bias or a wrong scale shows), as float64 NumPy and as float32 jnp."""
    shapes = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), x, *args))["params"])
    rng = np.random.default_rng(seed)
    ref = jax.tree.map(lambda s: scale * rng.standard_normal(s.shape), shapes)
    return ref, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), ref)


# ----------------------------------------------------------------------------------------------
# RoPE.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,head_dim", [(3, 5, 16), (4, 4, 8), (2, 7, 64)])
def test_rope_tables_float32_match_formula(h, w, head_dim):
    sin, cos = rope_tables(h, w, head_dim, bf16=False)
    ref_sin, ref_cos = ref_rope_tables_f64(h, w, head_dim)
    assert sin.shape == cos.shape == (h * w, head_dim) and sin.dtype == cos.dtype == np.float32
    np.testing.assert_allclose(sin, ref_sin, atol=1e-5, rtol=0)
    np.testing.assert_allclose(cos, ref_cos, atol=1e-5, rtol=0)


@pytest.mark.parametrize("h,w,head_dim", [(3, 5, 16), (16, 16, 64), (5, 12, 64)])
def test_rope_tables_bf16_match_per_op_rounding(h, w, head_dim):
    sin, cos = rope_tables(h, w, head_dim, bf16=True)
    ref_sin, ref_cos = ref_rope_tables_bf16(h, w, head_dim)
    np.testing.assert_array_equal(sin, ref_sin)
    np.testing.assert_array_equal(cos, ref_cos)
    # Every value is a bfloat16 number, and the chain's rounding is visible but small: a few
    # half-ulp errors on angles below 2*pi (ulp 2**-5 near the top) move sin/cos by < 0.06.
    np.testing.assert_array_equal(sin, sin.astype(BF16).astype(F32))
    f32_sin, f32_cos = rope_tables(h, w, head_dim, bf16=False)
    assert 0 < np.abs(sin - f32_sin).max() < 0.06
    assert 0 < np.abs(cos - f32_cos).max() < 0.06


def test_rope_tables_reject_head_dim_not_multiple_of_4():
    with pytest.raises(ValueError, match="head_dim divisible by 4, got 6"):
        rope_tables(2, 2, 6)


def test_apply_rope_float32_rotates_pairs_and_skips_prefix():
    h, w, heads, dh, n_prefix = 2, 3, 2, 8, 2
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, n_prefix + h * w, heads, dh))
    angles = ref_rope_angles(h, w, dh)
    sin, cos = (t.astype(F32) for t in ref_rope_tables_f64(h, w, dh))
    out = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), sin, cos, bf16=False))
    np.testing.assert_array_equal(out[:, :n_prefix], x[:, :n_prefix].astype(F32))
    np.testing.assert_allclose(out[:, n_prefix:], ref_rotate(x[:, n_prefix:], angles), atol=1e-5, rtol=1e-5)
    # A rotation keeps the norm of every pair.
    half = dh // 2
    np.testing.assert_allclose(out[..., :half] ** 2 + out[..., half:] ** 2,
                               x[..., :half] ** 2 + x[..., half:] ** 2, rtol=1e-4)


def test_apply_rope_bf16_matches_per_op_emulation():
    h, w, heads, dh, n_prefix = 3, 2, 2, 16, 1
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, n_prefix + h * w, heads, dh)).astype(F32)
    sin, cos = ref_rope_tables_bf16(h, w, dh)
    out = np.asarray(jax.jit(lambda a: apply_rope(a, sin, cos, bf16=True))(x))

    xb = x.astype(BF16)  # the release casts the whole q/k, prefix included
    t = xb[:, n_prefix:]
    rot = np.concatenate([-t[..., dh // 2:], t[..., : dh // 2]], -1)
    sb, cb = _bf(sin)[None, :, None], _bf(cos)[None, :, None]
    ref = np.concatenate([xb[:, :n_prefix], t * cb + rot * sb], 1).astype(F32)  # bf16 ufuncs round each op
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, ref)
    assert not np.array_equal(out[:, :n_prefix], x[:, :n_prefix])  # prefix was rounded to bf16


# ----------------------------------------------------------------------------------------------
# MLP sizes and norms.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width,hidden", [(384, 1024), (768, 2048), (1024, 2736)])
def test_mlp_hidden_swiglu_release_sizes(width, hidden):
    assert mlp_hidden("swiglu", width, 4.0) == hidden


@pytest.mark.parametrize("width", [32, 768, 1024])
def test_mlp_hidden_gelu_is_ratio_times_width(width):
    assert mlp_hidden("gelu", width, 4.0) == 4 * width


def test_l2_normalize_is_torch_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-13, 0.0]], np.float32)
    # x / max(||x||, 1e-12): unit rows, zeros stay zeros, tiny rows are divided by the eps.
    np.testing.assert_allclose(l2_normalize(jnp.asarray(x)), [[0.6, 0.8], [0.0, 0.0], [0.1, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(l2_normalize(jnp.asarray(x.T), axis=0), [[0.6, 0.0, 0.1], [0.8, 0.0, 0.0]], rtol=1e-6)
    grad = jax.grad(lambda a: l2_normalize(a).sum())(jnp.zeros((2, 3)))
    assert np.isfinite(grad).all()


@pytest.mark.parametrize("kind,eps", [("rmsnorm", 1e-5), ("layernorm", 1e-6)])
def test_norm_layer_default_eps(kind, eps):
    # Tiny-variance inputs make the epsilon dominate, so a wrong default shows.
    x = 1e-3 * np.random.default_rng(3).standard_normal((4, 16))
    layer = norm_layer(kind)
    out = layer.apply(layer.init(jax.random.key(0), jnp.asarray(x, jnp.float32)), jnp.asarray(x, jnp.float32))
    ones, zeros = np.ones(16), np.zeros(16)
    ref = ref_rms(x, ones, eps) if kind == "rmsnorm" else ref_layernorm(x, ones, zeros, eps)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)


def test_bad_layer_kinds_raise():
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'"):
        norm_layer("batchnorm")
    with pytest.raises(ValueError, match="unknown mlp 'relu'"):
        Mlp(8, "relu").init(jax.random.key(0), jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="unknown remat policy 'some'"):
        remat_block("some")


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_mlp_matches_numpy(kind):
    x = np.random.default_rng(4).standard_normal((2, 3, 8))
    mlp = Mlp(24, kind)
    ref_p, p = random_params(mlp, jnp.asarray(x, jnp.float32), seed=5)
    out = jax.jit(mlp.apply)({"params": p}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(out, ref_mlp(x, ref_p, kind), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Attention.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal,qk_norm", [(False, False), (True, False), (False, True)])
def test_attention_matches_numpy(causal, qk_norm):
    x = np.random.default_rng(6).standard_normal((2, 5, 16))
    attn = Attention(num_heads=2, qk_norm=qk_norm, causal=causal)
    ref_p, p = random_params(attn, jnp.asarray(x, jnp.float32), seed=7)
    assert p["qkv"]["kernel"].shape == (16, 3, 2, 8) and p["proj"]["kernel"].shape == (2, 8, 16)
    out = jax.jit(attn.apply)({"params": p}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(out, ref_attention(x, ref_p, causal=causal, qk_norm=qk_norm), rtol=1e-4, atol=1e-5)


def test_attention_with_rope_and_qk_norm_matches_numpy():
    h, w, n_prefix = 2, 3, 1
    x = np.random.default_rng(8).standard_normal((2, n_prefix + h * w, 16))
    attn = Attention(num_heads=2, qk_norm=True, rope_bf16=False)
    tables = tuple(t.astype(F32) for t in ref_rope_tables_f64(h, w, 8))
    ref_p, p = random_params(attn, jnp.asarray(x, jnp.float32), tables, seed=9)
    out = jax.jit(attn.apply)({"params": p}, jnp.asarray(x, jnp.float32), tables)
    ref = ref_attention(x, ref_p, qk_norm=True, angles=ref_rope_angles(h, w, 8))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    unrotated = ref_attention(x, ref_p, qk_norm=True)
    assert np.abs(unrotated - ref).max() > 1e-2  # RoPE does change the result


# ----------------------------------------------------------------------------------------------
# Block.
# ----------------------------------------------------------------------------------------------
def test_trunk_block_matches_numpy():
    """RMSNorm, SwiGLU, LayerScale, QK-norm, RoPE on the patch tokens behind one cls token."""
    h, w = 2, 2
    x = np.random.default_rng(10).standard_normal((2, 1 + h * w, 16))
    block = Block(num_heads=2, mlp_hidden=24, mlp="swiglu", norm="rmsnorm", qk_norm=True, layerscale=0.1,
                  rope_bf16=False)
    tables = tuple(t.astype(F32) for t in ref_rope_tables_f64(h, w, 8))
    ref_p, p = random_params(block, jnp.asarray(x, jnp.float32), tables, seed=11)
    assert p["ls1"].shape == p["ls2"].shape == (16,)
    out = jax.jit(block.apply)({"params": p}, jnp.asarray(x, jnp.float32), tables)
    ref = ref_block(x, ref_p, mlp="swiglu", norm="rmsnorm", eps=1e-5, qk_norm=True, layerscale=True,
                    angles=ref_rope_angles(h, w, 8))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_layerscale_only_when_configured():
    def names(**kw):
        return set(jax.eval_shape(Block(num_heads=2, mlp_hidden=8, **kw).init, jax.random.key(0),
                                  jnp.zeros((1, 3, 16)))["params"])

    assert {"ls1", "ls2"} <= names(layerscale=1e-5)
    assert not {"ls1", "ls2"} & names()


def test_text_block_matches_numpy():
    """LayerNorm eps 1e-5, GELU MLP, causal mask, no RoPE."""
    x = np.random.default_rng(12).standard_normal((2, 6, 16))
    block = Block(num_heads=2, mlp_hidden=64, mlp="gelu", norm="layernorm", norm_eps=1e-5, causal=True)
    ref_p, p = random_params(block, jnp.asarray(x, jnp.float32), seed=13)
    out = jax.jit(block.apply)({"params": p}, jnp.asarray(x, jnp.float32))
    ref = ref_block(x, ref_p, mlp="gelu", norm="layernorm", eps=1e-5, causal=True)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    # Causal: the first token does not see the others.
    x2 = x.copy()
    x2[:, 1:] += 1.0
    out2 = jax.jit(block.apply)({"params": p}, jnp.asarray(x2, jnp.float32))
    np.testing.assert_allclose(out2[:, 0], out[:, 0], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# DINOv2 batch-subset stochastic depth.
# ----------------------------------------------------------------------------------------------
B, N, D = 8, 3, 16


@pytest.fixture(scope="module")
def drop_block():
    x = np.random.default_rng(14).standard_normal((B, N, D))
    block = Block(num_heads=2, mlp_hidden=24)
    ref_p, p = random_params(block, jnp.asarray(x, jnp.float32), seed=15)
    return x, block, ref_p, p


def _kept_subsets(x, ref_p, out, scale):
    """Which samples' attention / MLP branches were applied, from the four candidate outputs per
    sample (each branch either added scaled by B / kept, or not at all)."""
    attn = ref_attention(ref_rms(x, ref_p["norm1"]["scale"]), ref_p["attn"])
    kept_attn, kept_mlp = [], []
    for i in range(B):
        matches = []
        for a in (0, 1):
            y = x[i] + a * scale * attn[i]
            m = ref_mlp(ref_rms(y, ref_p["norm2"]["scale"]), ref_p["mlp"], "swiglu")
            for k in (0, 1):
                if np.allclose(out[i], y + k * scale * m, rtol=1e-4, atol=1e-4):
                    matches.append((a, k))
        assert len(matches) == 1, f"sample {i} matches {matches} of the four drop-path outcomes"
        kept_attn.append(matches[0][0])
        kept_mlp.append(matches[0][1])
    return np.array(kept_attn, bool), np.array(kept_mlp, bool)


@pytest.mark.parametrize("rate", [0.5, 0.75])
def test_batch_subset_drop_path(drop_block, rate):
    x, block, ref_p, p = drop_block
    keep = int(B * (1 - rate))
    apply = jax.jit(lambda p, x, key: block.apply({"params": p}, x, None, rate, rngs={"drop_path": key}))
    subsets = []
    for seed in range(4):
        out = np.asarray(apply(p, jnp.asarray(x, jnp.float32), jax.random.key(seed)))
        kept_attn, kept_mlp = _kept_subsets(x, ref_p, out, B / keep)
        assert kept_attn.sum() == keep and kept_mlp.sum() == keep
        subsets.append((tuple(kept_attn), tuple(kept_mlp)))
    assert len(set(subsets)) > 1, "the kept subset does not depend on the rng"
    assert any(a != m for a, m in subsets), "attention and MLP branches always drop the same samples"


def test_drop_rate_zero_is_deterministic(drop_block):
    x, block, ref_p, p = drop_block
    xj = jnp.asarray(x, jnp.float32)
    plain = jax.jit(block.apply)({"params": p}, xj)
    with_rng = jax.jit(lambda p, x: block.apply({"params": p}, x, None, 0.0,
                                                rngs={"drop_path": jax.random.key(3)}))(p, xj)
    np.testing.assert_array_equal(plain, with_rng)
    np.testing.assert_allclose(plain, ref_block(x, ref_p, mlp="swiglu", norm="rmsnorm", eps=1e-5),
                               rtol=1e-4, atol=1e-5)


def test_remat_block_computes_the_same(drop_block):
    x, block, _, p = drop_block
    xj, key = jnp.asarray(x, jnp.float32), jax.random.key(5)

    def run(module):  # drop_rate must reach the block as a static Python float under remat
        return jax.jit(lambda p, x: module.apply({"params": p}, x, None, 0.5, rngs={"drop_path": key}))(p, xj)

    ref = run(block)
    for policy in ("full", "dots"):
        np.testing.assert_allclose(run(remat_block(policy)(num_heads=2, mlp_hidden=24)), ref, rtol=1e-6, atol=1e-6)
