"""The importer on checkpoints this test writes in the release's layout and naming.

The expected values come from a float64 NumPy forward pass written from the release's formulas
(released_vtp.md), with PyTorch layouts read directly: nothing here calls our key map.
"""
import dataclasses
import json
import math
import os

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from scipy.special import erf

import vtp_jax
from vtp_jax.checkpoints.released import CheckpointError

P, D, HEADS, DEPTH = 8, 64, 2, 1  # trunk
DD, DHEADS = 32, 2  # decoder
TW, THEADS = 32, 2  # text
LATENT, VOCAB, CTX = 64, 49408, 77
SWIGLU = 176  # int(int(64 * 4) * 2 / 3) = 170, rounded up to a multiple of 8
DSWIGLU = 88  # int(int(32 * 4) * 2 / 3) = 85 -> 88

RELEASE_CONFIG = dict(
    image_size=32, train_clip=True, train_reconstruction=True, vision_patch_size=P,
    vision_embed_dim=D, vision_depth=DEPTH, vision_num_heads=HEADS, vision_mlp_ratio=4.0,
    vision_ffn_layer="swiglu", vision_norm_layer="rmsnorm", vision_init_values=None,
    vision_use_qk_norm=False, vision_feature_bottleneck=LATENT, vision_bottleneck_ae_only=True,
    vision_clip_feat="cls", text_context_length=CTX, text_vocab_size=VOCAB, text_embed_dim=TW,
    text_num_heads=THEADS, text_depth=1, text_mlp_ratio=4.0, text_ls_init_value=None,
    text_embed_cls=False, text_pad_id=0, text_no_causal_mask=False, text_pool_type="argmax",
    text_proj_type="linear", text_proj_bias=False, text_output_tokens=False, text_quick_gelu=False,
    decoder_embed_dim=DD, decoder_num_heads=DHEADS, decoder_depth=1, decoder_ffn_layer="swiglu",
    decoder_norm_layer="layernorm", decoder_init_values=None, decoder_use_qk_norm=False,
    init_logit_scale=None, init_logit_bias=None, nonscalar_logit_scale=False, model_type="vtp")


def _periods(head_dim):
    """The release's bf16 RoPE `periods` buffer."""
    bf = ml_dtypes.bfloat16
    e = (2 * np.arange(head_dim // 4).astype(bf)).astype(bf) / np.array(head_dim // 2, bf)
    return (np.array(100.0, bf) ** e.astype(bf)).astype(bf).astype(np.float32)


def release_tensors(seed=0, depth=DEPTH):
    """Every tensor of a tiny release checkpoint (trunk of `depth` blocks), in PyTorch layout,
    random values."""
    rng = np.random.default_rng(seed)
    t = {}

    def add(name, *shape, scale=0.1):
        t[name] = (scale * rng.standard_normal(shape)).astype(np.float32)

    def block(prefix, width, hidden, layernorm):
        for n in ("norm1", "norm2"):
            t[f"{prefix}.{n}.weight"] = (1 + 0.1 * rng.standard_normal(width)).astype(np.float32)
            if layernorm:
                add(f"{prefix}.{n}.bias", width)
        add(f"{prefix}.attn.qkv.weight", 3 * width, width)
        add(f"{prefix}.attn.qkv.bias", 3 * width)
        add(f"{prefix}.attn.proj.weight", width, width)
        add(f"{prefix}.attn.proj.bias", width)
        for n, shape in (("w1", (hidden, width)), ("w2", (hidden, width)), ("w3", (width, hidden))):
            add(f"{prefix}.mlp.{n}.weight", *shape)
            add(f"{prefix}.mlp.{n}.bias", shape[0])

    add("trunk.patch_embed.proj.weight", D, 3, P, P)
    add("trunk.patch_embed.proj.bias", D)
    add("trunk.cls_token", 1, 1, D, scale=1.0)
    add("trunk.mask_token", 1, D)
    t["trunk.rope_embed.periods"] = _periods(D // HEADS)
    for i in range(depth):
        block(f"trunk.blocks.{i}", D, SWIGLU, False)
    t["trunk.norm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    add("trunk.feature_bottleneck.weight", LATENT, D)
    add("pixel_decoder.proj_in.weight", DD, LATENT, 1, 1)
    add("pixel_decoder.proj_in.bias", DD)
    t["pixel_decoder.rope_embed.periods"] = _periods(DD // DHEADS)
    block("pixel_decoder.blocks.0", DD, DSWIGLU, True)
    t["pixel_decoder.norm.weight"] = (1 + 0.1 * rng.standard_normal(DD)).astype(np.float32)
    add("pixel_decoder.norm.bias", DD)
    add("pixel_decoder.proj_out.weight", 3 * P * P, DD, 1, 1)
    add("pixel_decoder.proj_out.bias", 3 * P * P)
    add("token_embedding.weight", VOCAB, TW)
    add("positional_embedding", CTX, TW)
    r = "text_transformer.resblocks.0"
    for n in ("ln_1", "ln_2"):
        t[f"{r}.{n}.weight"] = (1 + 0.1 * rng.standard_normal(TW)).astype(np.float32)
        add(f"{r}.{n}.bias", TW)
    add(f"{r}.attn.in_proj_weight", 3 * TW, TW)
    add(f"{r}.attn.in_proj_bias", 3 * TW)
    add(f"{r}.attn.out_proj.weight", TW, TW)
    add(f"{r}.attn.out_proj.bias", TW)
    add(f"{r}.mlp.c_fc.weight", 4 * TW, TW)
    add(f"{r}.mlp.c_fc.bias", 4 * TW)
    add(f"{r}.mlp.c_proj.weight", TW, 4 * TW)
    add(f"{r}.mlp.c_proj.bias", TW)
    t["ln_final.weight"] = (1 + 0.1 * rng.standard_normal(TW)).astype(np.float32)
    add("ln_final.bias", TW)
    add("text_projection", TW, TW)
    add("visual_proj.weight", TW, D)
    t["logit_scale"] = np.array(math.log(1 / 0.07), np.float32)
    return t


def write_release(folder, tensors, config=RELEASE_CONFIG, bf16=False):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    path = os.path.join(folder, "model.safetensors")
    if not bf16:
        safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)
        return
    # safetensors' NumPy API has no bfloat16: write the documented format by hand.
    header, blobs, offset = {}, [], 0
    for k, v in tensors.items():
        b = np.ascontiguousarray(v.astype(ml_dtypes.bfloat16)).tobytes()
        header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


# ------------------------------------------------------------------------------------------
# Float64 NumPy reference of the released model (RoPE in float64: see test_rope_* for bf16).
# ------------------------------------------------------------------------------------------
def rms(x, w):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * w


def ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def gelu(x):
    """Exact (erf) GELU, torch.nn.GELU's default."""
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def norm(t, name, kind):
    """The checkpoint's norm `name`: RMSNorm (eps 1e-5, the released trunk) or LayerNorm (eps
    1e-6, the released decoder's; see test_any_release_config_qk_norm_layerscale_gelu for a
    LayerNorm trunk)."""
    if kind == "rmsnorm":
        return lambda v: rms(v, t[f"{name}.weight"])
    return lambda v: ln(v, t[f"{name}.weight"], t[f"{name}.bias"], 1e-6)


def rope_angles(h, w, head_dim):
    coords = np.stack(np.meshgrid((np.arange(h) + 0.5) / h * 2 - 1, (np.arange(w) + 0.5) / w * 2 - 1,
                                  indexing="ij"), -1).reshape(h * w, 2)
    periods = 100.0 ** (2 * np.arange(head_dim // 4) / (head_dim // 2))
    return (2 * np.pi * coords[:, :, None] / periods).reshape(h * w, head_dim // 2)


def rotate(x, angles):
    """Pairs (i, i + dh/2) as complex numbers times exp(i * angle)."""
    half = x.shape[-1] // 2
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angles)
    return np.concatenate([z.real, z.imag], -1)


def attention(x, wqkv, bqkv, wo, bo, heads, angles=None, causal=False, qk_norm=None):
    """`qk_norm`: (q weight, k weight), an RMSNorm over head_dim of q and k before RoPE."""
    n, width = x.shape[-2:]
    qkv = (x @ wqkv.T + bqkv).reshape(*x.shape[:-1], 3, heads, width // heads)
    q, k, v = (np.moveaxis(qkv[..., i, :, :], -2, -3) for i in range(3))  # (B, heads, N, dh)
    if qk_norm is not None:
        q, k = rms(q, qk_norm[0]), rms(k, qk_norm[1])
    if angles is not None:
        r = angles.shape[0]
        q = np.concatenate([q[..., :n - r, :], rotate(q[..., n - r:, :], angles)], -2)
        k = np.concatenate([k[..., :n - r, :], rotate(k[..., n - r:, :], angles)], -2)
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(width // heads)
    if causal:
        s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.moveaxis(a @ v, -3, -2).reshape(*x.shape[:-1], width)
    return o @ wo.T + bo


def vit_block(x, t, pre, heads, angles, norm_kind, mlp="swiglu", qk_norm=False, layerscale=False):
    """x + ls1 * attn(norm1 x); x + ls2 * mlp(norm2 x); the gammas only with `layerscale`, the
    QK RMSNorm only with `qk_norm`; mlp: SwiGLU w3(silu(w1 x) * w2 x) or GELU fc2(gelu(fc1 x))."""
    g = lambda n: t[f"{pre}.{n}"]  # noqa: E731
    gamma = (lambda n: g(f"{n}.gamma")) if layerscale else (lambda n: 1.0)  # noqa: E731
    qk = (g("attn.q_norm.weight"), g("attn.k_norm.weight")) if qk_norm else None
    x = x + gamma("ls1") * attention(norm(t, f"{pre}.norm1", norm_kind)(x), g("attn.qkv.weight"),
                                     g("attn.qkv.bias"), g("attn.proj.weight"), g("attn.proj.bias"), heads,
                                     angles, qk_norm=qk)
    y = norm(t, f"{pre}.norm2", norm_kind)(x)
    lin = lambda n, v: v @ g(f"mlp.{n}.weight").T + g(f"mlp.{n}.bias")  # noqa: E731
    if mlp == "swiglu":
        h1 = lin("w1", y)
        return x + gamma("ls2") * lin("w3", h1 / (1 + np.exp(-h1)) * lin("w2", y))
    return x + gamma("ls2") * lin("fc2", gelu(lin("fc1", y)))


def np_trunk(t, images, depth=DEPTH, norm_kind="rmsnorm", **block):
    """[(cls (B, D), patches (B, h, w, D))] after each block, through the FINAL norm (the
    release's get_intermediate_layers(norm=True)); the last pair is the trunk's output.
    `block`: vit_block's variant options (mlp, qk_norm, layerscale)."""
    b, hh, ww, _ = images.shape
    h, w = hh // P, ww // P
    patches = images.reshape(b, h, P, w, P, 3)
    x = np.einsum("byixjc,dcij->byxd", patches, t["trunk.patch_embed.proj.weight"]) + t["trunk.patch_embed.proj.bias"]
    x = np.concatenate([np.broadcast_to(t["trunk.cls_token"], (b, 1, D)), x.reshape(b, h * w, D)], 1)
    final_norm = norm(t, "trunk.norm", norm_kind)
    outputs = []
    for i in range(depth):
        x = vit_block(x, t, f"trunk.blocks.{i}", HEADS, rope_angles(h, w, D // HEADS), norm_kind, **block)
        y = final_norm(x)
        outputs.append((y[:, 0], y[:, 1:].reshape(b, h, w, D)))
    return outputs


def np_decoder(t, latents):
    b, h, w, _ = latents.shape
    x = latents.reshape(b, h * w, LATENT) @ t["pixel_decoder.proj_in.weight"][:, :, 0, 0].T + t["pixel_decoder.proj_in.bias"]
    x = vit_block(x, t, "pixel_decoder.blocks.0", DHEADS, rope_angles(h, w, DD // DHEADS), "layernorm")
    x = norm(t, "pixel_decoder.norm", "layernorm")(x)
    x = x @ t["pixel_decoder.proj_out.weight"][:, :, 0, 0].T + t["pixel_decoder.proj_out.bias"]
    out = np.zeros((b, h * P, w * P, 3))
    x = x.reshape(b, h, w, 3 * P * P)
    for c in range(3):  # channel c*p*p + i*p + j -> pixel (p*y + i, p*x + j), colour c
        for i in range(P):
            for j in range(P):
                out[:, i::P, j::P, c] = x[..., c * P * P + i * P + j]
    return out


def np_text(t, tokens):
    x = t["token_embedding.weight"][tokens] + t["positional_embedding"]
    r = "text_transformer.resblocks.0"
    g = lambda n: t[f"{r}.{n}"]  # noqa: E731
    x = x + attention(ln(x, g("ln_1.weight"), g("ln_1.bias"), 1e-5), g("attn.in_proj_weight"),
                      g("attn.in_proj_bias"), g("attn.out_proj.weight"), g("attn.out_proj.bias"), THEADS,
                      causal=True)
    y = ln(x, g("ln_2.weight"), g("ln_2.bias"), 1e-5) @ g("mlp.c_fc.weight").T + g("mlp.c_fc.bias")
    x = x + gelu(y) @ g("mlp.c_proj.weight").T + g("mlp.c_proj.bias")
    x = ln(x, t["ln_final.weight"], t["ln_final.bias"], 1e-5)
    pooled = x[np.arange(len(tokens)), tokens.argmax(-1)]
    e = pooled @ t["text_projection"]
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


def close(a, b, tol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.abs(a - b).max() / np.abs(b).max()
    assert err < tol, err


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("release"))
    tensors = release_tensors()
    write_release(folder, tensors)
    return folder, {k: v.astype(np.float64) for k, v in tensors.items()}


def _f32_rope(pre):
    """Same weights, float32 RoPE: the float64 reference has no bf16 rounding to follow."""
    config = pre.config.copy_and_resolve_references()
    config.rope_bf16 = False
    return dataclasses.replace(pre, config=config, _fns={})


@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])
def test_import_matches_numpy_forward(release, hw):
    folder, t = release
    pre = vtp_jax.load_pretrained(folder)
    assert pre.config.rope_bf16, "released checkpoints rotate q/k in bfloat16"
    exact = _f32_rope(pre)
    images = np.random.default_rng(1).standard_normal((2, *hw, 3)).astype(np.float32)
    cls, patches = np_trunk(t, images.astype(np.float64))[-1]
    latents = patches @ t["trunk.feature_bottleneck.weight"].T
    close(exact.encode(images), latents, 1e-5)
    emb = cls @ t["visual_proj.weight"].T
    close(exact.image_features(images), emb / np.linalg.norm(emb, axis=-1, keepdims=True), 1e-5)
    close(exact.decode(latents.astype(np.float32)), np_decoder(t, latents), 1e-5)
    # The bf16 rotation the release uses moves results by about bf16 epsilon, no more.
    close(pre.encode(images), latents, 2e-2)
    assert pre.encode(images).shape == (2, hw[0] // P, hw[1] // P, LATENT)


def test_text_features_match_numpy(release):
    folder, t = release
    pre = vtp_jax.load_pretrained(folder)
    tokens = pre.tokenize(["a photo of a cat", "a large red triangle on a striped background"])
    assert tokens.shape == (2, CTX) and tokens.dtype == np.int32
    close(pre.text_features(tokens), np_text(t, tokens), 1e-5)


def test_bfloat16_checkpoint(tmp_path):
    tensors = release_tensors(seed=3)
    write_release(str(tmp_path), tensors, bf16=True)
    pre = vtp_jax.load_pretrained(str(tmp_path))
    rounded = tensors["trunk.patch_embed.proj.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(pre.params["trunk"]["patch_embed"]["kernel"]),
                                  rounded.transpose(2, 3, 1, 0))
    assert pre.params["trunk"]["patch_embed"]["kernel"].dtype == np.float32


def test_features_intermediate_layers(tmp_path):
    """A 3-block trunk: each requested block's output through the FINAL norm, as the release's
    get_intermediate_layers(norm=True), patches and cls, on a non-square grid."""
    tensors = release_tensors(seed=5, depth=3)
    write_release(str(tmp_path), tensors, dict(RELEASE_CONFIG, vision_depth=3))
    pre = _f32_rope(vtp_jax.load_pretrained(str(tmp_path)))
    images = np.random.default_rng(6).standard_normal((2, 16, 24, 3)).astype(np.float32)
    f = pre.features(images, layers=[0, 1, -1])
    ref = np_trunk({k: v.astype(np.float64) for k, v in tensors.items()}, images.astype(np.float64), depth=3)
    close(f["cls"], ref[-1][0], 1e-5)
    close(f["patches"], ref[-1][1], 1e-5)
    assert len(f["intermediates"]) == len(f["intermediate_cls"]) == 3
    for got_cls, got, (want_cls, want) in zip(f["intermediate_cls"], f["intermediates"], ref):  # blocks 0, 1, 2
        close(got_cls, want_cls, 1e-5)
        close(got, want, 1e-5)
    # Block 0 is not the output: a model returning the final features for every layer fails.
    assert np.abs(f["intermediates"][0] - f["patches"]).max() > 0.1 * np.abs(f["patches"]).max()
    assert np.abs(f["intermediate_cls"][0] - f["cls"]).max() > 0.1 * np.abs(f["cls"]).max()


def test_any_release_config_qk_norm_layerscale_gelu(tmp_path):
    """A config outside S/B/L: QK-norm, LayerScale, GELU MLP and LayerNorm in the trunk, every
    one of their tensors distinct and random, so that a swapped or ignored key shows."""
    config = dict(RELEASE_CONFIG, vision_use_qk_norm=True, vision_init_values=0.1,
                  vision_ffn_layer="mlp", vision_norm_layer="layernorm", train_clip=False)
    t = {k: v for k, v in release_tensors().items() if k.startswith(("trunk", "pixel_decoder"))}
    rng = np.random.default_rng(7)

    def rand(*shape, loc=0.0, scale=0.1):
        return (loc + scale * rng.standard_normal(shape)).astype(np.float32)

    pre_ = "trunk.blocks.0"
    for n in ("w1", "w2", "w3"):
        del t[f"{pre_}.mlp.{n}.weight"], t[f"{pre_}.mlp.{n}.bias"]
    t.update({f"{pre_}.mlp.fc1.weight": rand(4 * D, D), f"{pre_}.mlp.fc1.bias": rand(4 * D),
              f"{pre_}.mlp.fc2.weight": rand(D, 4 * D), f"{pre_}.mlp.fc2.bias": rand(D),
              f"{pre_}.attn.q_norm.weight": rand(D // HEADS, loc=1.0, scale=0.5),
              f"{pre_}.attn.k_norm.weight": rand(D // HEADS, loc=1.0, scale=0.5),
              f"{pre_}.ls1.gamma": rand(D, loc=0.5, scale=0.3), f"{pre_}.ls2.gamma": rand(D, loc=0.5, scale=0.3),
              f"{pre_}.norm1.bias": rand(D), f"{pre_}.norm2.bias": rand(D), "trunk.norm.bias": rand(D)})
    write_release(str(tmp_path), t, config)
    pre = vtp_jax.load_pretrained(str(tmp_path))
    assert pre.config.qk_norm and pre.config.mlp == "gelu" and pre.config.layerscale == 0.1
    assert pre.config.text.depth == 0
    images = np.random.default_rng(8).standard_normal((2, 16, 24, 3)).astype(np.float32)
    # LayerNorm eps 1e-6 as our norm_layer("layernorm"); the release's official code matched our
    # import of such a variant to 2.6e-5 in an earlier parity run (torch, not run here).
    _, patches = np_trunk({k: v.astype(np.float64) for k, v in t.items()}, images.astype(np.float64),
                          norm_kind="layernorm", mlp="gelu", qk_norm=True, layerscale=True)[-1]
    latents = patches @ t["trunk.feature_bottleneck.weight"].astype(np.float64).T
    close(_f32_rope(pre).encode(images), latents, 1e-5)


def test_errors_name_every_bad_key(tmp_path):
    t = release_tensors()
    del t["trunk.blocks.0.attn.qkv.bias"]
    t["trunk.blocks.0.attn.extra"] = np.zeros(3, np.float32)
    t["trunk.feature_bottleneck.weight"] = np.zeros((LATENT, D + 1), np.float32)
    write_release(str(tmp_path), t)
    with pytest.raises(CheckpointError) as e:
        vtp_jax.load_pretrained(str(tmp_path))
    msg = str(e.value)
    for needle in ("missing key: trunk.blocks.0.attn.qkv.bias", "unexpected key: trunk.blocks.0.attn.extra",
                   "trunk.feature_bottleneck.weight: shape (64, 65)", "3 problem(s)"):
        assert needle in msg, msg


def test_errors_truncated_file_and_bad_options(tmp_path):
    write_release(str(tmp_path / "a"), release_tensors())
    path = tmp_path / "a" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"the file holds \d+: truncated\?"):  # not the path's "truncated"
        vtp_jax.load_pretrained(str(tmp_path / "a"))
    write_release(str(tmp_path / "b"), release_tensors(), dict(RELEASE_CONFIG, text_quick_gelu=True,
                                                               vision_ffn_layer="moe"))
    with pytest.raises(CheckpointError, match="text_quick_gelu=True.*vision_ffn_layer='moe'"):
        vtp_jax.load_pretrained(str(tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        vtp_jax.load_pretrained(str(tmp_path / "missing"))
    write_release(str(tmp_path / "c"), {"x": np.zeros(1, np.float32)})
    (tmp_path / "c" / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        vtp_jax.load_pretrained(str(tmp_path / "c"))


def test_export_roundtrip(release, tmp_path):
    """Our params written in the release format read back to the same tensors and the same
    release files (names, layouts and shapes) as the checkpoint we started from."""
    from vtp_jax.checkpoints import released
    from vtp_jax.data import files

    folder, t = release
    pre = vtp_jax.load_pretrained(folder)
    released.export_release(pre.config, pre.params, str(tmp_path), image_size=32)
    back = files.read_safetensors(str(tmp_path / "model.safetensors"))  # the one reader, on our export
    assert set(back) == set(t)
    for k, v in t.items():
        np.testing.assert_allclose(back[k], v, rtol=1e-6, atol=0, err_msg=k)
    again = vtp_jax.load_pretrained(str(tmp_path))
    images = np.random.default_rng(0).standard_normal((1, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(again.encode(images), pre.encode(images))
