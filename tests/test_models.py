"""The VTP model, its modules and configs: shapes, dtypes, logical axes, release tensor counts,
and the parts with a closed form (pixel shuffle, CLIP projections, DINO head) against NumPy."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from vtp_jax.config import VIT_SIZES, check_fields, model_config, with_size
from vtp_jax.models.heads import DINOHead
from vtp_jax.models.layers import mlp_hidden
from vtp_jax.models.vtp import VTP, Encoder, PixelDecoder, TextTower, param_shapes
from vtp_jax.sharding import LOGICAL_RULES

P, WIDTH, CLIP, K, VOCAB, CTX = 4, 32, 16, 24, 64, 8


def tiny_config(**overrides):
    c = model_config()
    c.patch_size = P
    c.width, c.depth, c.num_heads = WIDTH, 2, 2
    c.decoder.width, c.decoder.depth, c.decoder.num_heads = WIDTH, 1, 2
    c.text.width, c.text.depth, c.text.num_heads = WIDTH, 1, 2
    c.text.vocab_size, c.text.context_length = VOCAB, CTX
    c.clip_dim = CLIP
    c.head.prototypes, c.head.hidden_dim, c.head.bottleneck_dim = K, 16, 8
    c.update(overrides)
    return c


def random_params(c, seed=0):
    """Random float32 values in the shapes of `param_shapes(c)`: forward tests need no real init
    (whose XLA compile alone takes many seconds on 2 cores); norm scales stay near 1."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        x = 0.1 * rng.standard_normal(s.shape)
        return jnp.asarray(x + 1 if path[-1].key == "scale" else x, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, param_shapes(c))


@pytest.fixture(scope="module")
def tiny():
    c = tiny_config()
    return c, random_params(c)


def images(b, h, w, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, h, w, 3)), jnp.float32)


def l2n(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Configs and release sizes.
# ----------------------------------------------------------------------------------------------
def test_vit_sizes_are_the_release_table():
    assert VIT_SIZES == {"S": dict(width=384, depth=12, num_heads=6), "B": dict(width=768, depth=12, num_heads=12),
                         "L": dict(width=1024, depth=24, num_heads=16)}
    c = with_size(model_config(), "L", decoder_depth=4)  # the paper's light decoder
    assert (c.width, c.depth, c.num_heads) == (1024, 24, 16)
    assert (c.decoder.width, c.decoder.depth, c.decoder.num_heads) == (1024, 4, 16)
    assert with_size(model_config(), "S").decoder.depth == 12  # symmetric by default


def test_check_fields_names_every_unknown_field():
    schema = model_config()
    check_fields(tiny_config(), schema)  # a valid config passes
    bad = model_config()
    bad.widht = 3
    bad.decoder.dpth = 2
    with pytest.raises(ValueError, match=r"decoder\.dpth, widht"):
        check_fields(bad, schema)


def _release_block_params(d, hidden, norm_bias):
    """One trunk/decoder block: norms, qkv and proj with bias, SwiGLU w1/w2/w3 with bias."""
    return (2 * d * (2 if norm_bias else 1) + d * 3 * d + 3 * d + d * d + d
            + 2 * (d * hidden + hidden) + hidden * d + d)


def _expected_param_counts(size):
    """Closed-form parameter counts of each subtree (released_vtp.md), patch 16, latent 64."""
    d, depth = VIT_SIZES[size]["width"], VIT_SIZES[size]["depth"]
    hidden = {"S": 1024, "B": 2048, "L": 2736}[size]
    tw = 768
    text_block = 2 * 2 * tw + tw * 3 * tw + 3 * tw + tw * tw + tw + tw * 4 * tw + 4 * tw + 4 * tw * tw + tw
    return {
        "trunk": 16 * 16 * 3 * d + d + d + d + depth * _release_block_params(d, hidden, False) + d,
        "feature_bottleneck": d * 64,
        "pixel_decoder": 64 * d + d + depth * _release_block_params(d, hidden, True) + 2 * d + d * 768 + 768,
        "text": 49408 * tw + 77 * tw + 12 * text_block + 2 * tw + 1 + tw * 768,
        "visual_proj": d * 768,
        "dino_head": d * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 256 + 256 + 256 * 65536,
    }


def test_param_shapes_do_not_depend_on_the_image_size():
    """param_shapes traces at 4 patches; the pretrain job builds its optimizer on them for any
    data.image_size (RoPE positions, no learned position table)."""
    c = tiny_config()
    for size in (16, 48):
        at_size = jax.eval_shape(lambda: nn.meta.unbox(VTP(c).init(jax.random.key(0), jnp.zeros((1, size, size, 3)))))
        assert jax.tree.map(lambda x: (x.shape, x.dtype), at_size["params"]) == \
            jax.tree.map(lambda x: (x.shape, x.dtype), param_shapes(c))


@pytest.mark.parametrize("size", ["S", "B", "L"])
def test_param_shapes_of_released_sizes(size):
    shapes = param_shapes(with_size(model_config(), size))
    d, depth, heads = (VIT_SIZES[size][k] for k in ("width", "depth", "num_heads"))
    hidden = mlp_hidden("swiglu", d, 4.0)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
    counts = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for k, v in shapes.items()}
    assert counts == _expected_param_counts(size)
    n_tensors = {k: len(jax.tree.leaves(v)) for k, v in shapes.items()}
    # Release trunk: cls, mask, patch embed weight and bias, the bf16 RoPE `periods` buffer (which
    # we do not hold), 12 per block, final norm, bottleneck. Decoder: proj_in weight and bias,
    # `periods`, 14 per block, final norm weight and bias, proj_out weight and bias.
    assert n_tensors["trunk"] + n_tensors["feature_bottleneck"] == (5 + 12 * depth + 2) - 1
    assert n_tensors["pixel_decoder"] == (3 + 14 * depth + 4) - 1
    assert n_tensors["text"] + n_tensors["visual_proj"] == 151
    assert n_tensors["dino_head"] == 7
    if size == "L":  # released VTP-L: 789 tensors = 295 trunk + 343 pixel_decoder + 151 text/CLIP
        assert (n_tensors["trunk"] + n_tensors["feature_bottleneck"], n_tensors["pixel_decoder"]) == (295 - 1, 343 - 1)
    t, dec = shapes["trunk"], shapes["pixel_decoder"]
    assert t["patch_embed"]["kernel"].shape == (16, 16, 3, d)
    assert t["cls_token"].shape == (1, 1, d) and t["mask_token"].shape == (1, d)
    assert t["blocks_0"]["attn"]["qkv"]["kernel"].shape == (d, 3, heads, 64)
    assert t["blocks_0"]["attn"]["proj"]["kernel"].shape == (heads, 64, d)
    assert t["blocks_0"]["mlp"]["w1"]["kernel"].shape == (d, hidden)
    assert t["blocks_0"]["mlp"]["w3"]["kernel"].shape == (hidden, d)
    assert shapes["feature_bottleneck"]["kernel"].shape == (d, 64)
    assert dec["proj_in"]["kernel"].shape == (64, d) and dec["proj_out"]["kernel"].shape == (d, 3 * 16 * 16)
    assert shapes["text"]["token_embedding"].shape == (49408, 768)
    assert shapes["text"]["positional_embedding"].shape == (77, 768)
    assert shapes["text"]["text_projection"].shape == (768, 768)
    assert shapes["visual_proj"]["kernel"].shape == (d, 768)
    assert shapes["dino_head"]["prototypes"].shape == (256, 65536)


def test_optional_parts_add_their_tensors():
    c = tiny_config(qk_norm=True, layerscale=1e-5, n_registers=2, latent_dim=256)
    c.text.depth, c.head.prototypes = 0, 0
    shapes = param_shapes(c)
    assert set(shapes) == {"trunk", "feature_bottleneck", "pixel_decoder"}
    block = shapes["trunk"]["blocks_0"]
    assert block["attn"]["q_norm"]["scale"].shape == block["attn"]["k_norm"]["scale"].shape == (WIDTH // 2,)
    assert block["ls1"].shape == block["ls2"].shape == (WIDTH,)
    assert shapes["trunk"]["registers"].shape == (1, 2, WIDTH)
    assert shapes["feature_bottleneck"]["kernel"].shape == (WIDTH, 256)
    assert shapes["pixel_decoder"]["proj_in"]["kernel"].shape == (256, WIDTH)
    assert "q_norm" not in shapes["pixel_decoder"]["blocks_0"]["attn"]


def test_every_param_has_logical_axes_from_the_sharding_rules():
    c = tiny_config(qk_norm=True, layerscale=1e-5, n_registers=1)
    variables = jax.eval_shape(VTP(c).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    leaves = jax.tree_util.tree_leaves_with_path(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    unboxed = [jax.tree_util.keystr(k) for k, v in leaves if not isinstance(v, nn.Partitioned)]
    assert not unboxed, f"parameters without logical axis names: {unboxed}"
    declared = {name for name, _ in LOGICAL_RULES if not name.startswith("activation_")} | {None}
    for path, box in leaves:
        where = jax.tree_util.keystr(path)
        assert len(box.names) == len(box.value.shape), f"{where}: names {box.names} for shape {box.value.shape}"
        assert set(box.names) <= declared, f"{where}: axis names {box.names} not in the sharding rules"
    specs = jax.tree.leaves(nn.get_partition_spec(variables["params"]),
                            is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    assert len(specs) == len(leaves)
    assert ("vocab", "embed") in {tuple(s) for s in specs}  # the token embedding
    assert ("embed", None, "heads", "kv") in {tuple(s) for s in specs}  # fused qkv


# ----------------------------------------------------------------------------------------------
# Forward passes of a tiny model.
# ----------------------------------------------------------------------------------------------
def _apply(c, params, method, *args):
    return jax.jit(lambda p, *a: VTP(c).apply({"params": p}, *a, method=method))(params, *args)


def _paths(m, x):
    feats = m.encode_features(x)
    latents = m.bottleneck(feats["patches"])
    return dict(feats=feats, latents=latents, recon=m.decode(latents), clip=m.clip_image(feats),
                head=m.head(feats["cls"]), encode=m.encode(x))


@functools.cache
def tiny_paths(dtype="float32", clip_feat="cls"):
    """Every inference path of the tiny model in one jitted function (one compile per shape)."""
    c = tiny_config(dtype=dtype, clip_feat=clip_feat)
    return jax.jit(lambda p, x: VTP(c).apply({"params": p}, x, method=_paths))


@pytest.mark.parametrize("h,w", [(16, 16), (16, 24)])
def test_forward_shapes(tiny, h, w):
    _, params = tiny
    out = tiny_paths()(params, images(2, h, w))
    latents, recon = out["latents"], out["recon"]
    assert latents.shape == (2, h // P, w // P, 64) and latents.dtype == jnp.float32
    np.testing.assert_array_equal(out["encode"], latents)
    assert out["feats"]["cls"].shape == (2, WIDTH) and out["feats"]["patches"].shape == (2, h // P, w // P, WIDTH)
    assert out["clip"].shape == (2, CLIP) and out["head"].shape == (2, K)
    assert recon.shape == (2, h, w, 3) and recon.dtype == jnp.float32
    assert np.isfinite(recon).all()


def test_encoder_features_and_intermediates(tiny):
    c, params = tiny
    feats = _apply(c, params, lambda m, x: m.encode_features(x, return_layers=(0, -1)), images(2, 8, 12))
    assert feats["cls"].shape == (2, WIDTH) and feats["patches"].shape == (2, 2, 3, WIDTH)
    assert feats["registers"].shape == (2, 0, WIDTH)
    assert [f.shape for f in feats["intermediates"]] == [(2, 2, 3, WIDTH)] * 2
    # The last block's normed patch tokens are the output patches; the first block's are not.
    np.testing.assert_allclose(feats["intermediates"][1], feats["patches"], rtol=1e-6, atol=1e-6)
    assert np.abs(feats["intermediates"][0] - feats["patches"]).max() > 1e-3


def test_registers_are_prefix_tokens():
    c = tiny_config(n_registers=3)
    params = random_params(c, seed=1)
    feats = _apply(c, params, VTP.encode_features, images(2, 8, 8))
    assert feats["registers"].shape == (2, 3, WIDTH) and feats["patches"].shape == (2, 2, 2, WIDTH)


def test_image_size_not_multiple_of_patch_is_rejected(tiny):
    c, params = tiny
    with pytest.raises(ValueError, match=r"15x16 is not a multiple of the patch size 4"):
        VTP(c).apply({"params": params}, images(1, 15, 16), method=VTP.encode)


def test_mask_token_replaces_masked_patch_embeddings(tiny):
    """Pixels under masked patches stop mattering; elsewhere they still do (non-square grid, so
    a transposed mask layout would fail)."""
    c, params = tiny
    x = np.asarray(images(1, 8, 12))
    masks = np.zeros((1, 2, 3), bool)
    masks[0, 1, 0] = True  # patch row 1, column 0: pixels [4:8, 0:4]
    x2 = x.copy()
    x2[0, 4:8, 0:4] += 1.0
    both = jnp.asarray(np.concatenate([x, x2]))
    encode = jax.jit(lambda p, a, m: VTP(c).apply({"params": p}, a, m, method=VTP.encode_features)["patches"])
    masked = encode(params, both, jnp.asarray(np.concatenate([masks, masks])))
    np.testing.assert_allclose(masked[0], masked[1], rtol=1e-6, atol=1e-6)
    unmasked = encode(params, both, jnp.zeros((2, 2, 3), bool))
    assert np.abs(unmasked[0] - unmasked[1]).max() > 1e-3


@pytest.mark.parametrize("clip_feat", ["cls", "pooled"])
def test_clip_image_is_normalized_projection(tiny, clip_feat):
    _, params = tiny
    out = tiny_paths(clip_feat=clip_feat)(params, images(2, 16, 16))
    feats, emb = out["feats"], out["clip"]
    x = np.asarray(feats["cls"] if clip_feat == "cls" else np.asarray(feats["patches"]).mean((1, 2)), np.float64)
    ref = l2n(x @ np.asarray(params["visual_proj"]["kernel"], np.float64))
    assert emb.shape == (2, CLIP)
    np.testing.assert_allclose(emb, ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)


def test_clip_text_pools_eot_and_is_causal(tiny):
    c, params = tiny
    eot = VOCAB - 1
    tokens = np.array([[VOCAB - 2, 5, 7, eot, 0, 0, 0, 0],
                       [VOCAB - 2, 9, eot, 3, 4, 2, 1, 1]], np.int32)
    clip_text = jax.jit(lambda t: VTP(c).apply({"params": params}, t, method=VTP.clip_text))
    emb = clip_text(tokens)
    assert emb.shape == (2, CLIP) and emb.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    after = tokens.copy()
    after[0, 4:] = [11, 12, 13, 14]  # behind the EOT: invisible to a causal tower pooled at EOT
    after[1, 3:] = 0
    np.testing.assert_allclose(clip_text(after), emb, rtol=1e-5, atol=1e-6)
    before = tokens.copy()
    before[:, 1] = 20
    assert np.abs(clip_text(before) - emb).max() > 1e-3


def test_logit_scale_init_is_openclip():
    """The initialized parameter, not the constant: OpenCLIP's log(1/0.07) in float32, and VTP
    initializes it from the config's init_logit_scale (not from TextTower's own default)."""
    tokens = jnp.zeros((1, 4), jnp.int32)
    tower = TextTower(width=16, depth=1, num_heads=2, out_dim=8, vocab_size=32, context_length=4)
    scale = jax.jit(tower.init)(jax.random.key(0), tokens)["params"]["logit_scale"].value
    assert scale.shape == () and scale.dtype == jnp.float32
    assert scale == np.float32(np.log(1 / 0.07))
    assert model_config().init_logit_scale == pytest.approx(np.log(1 / 0.07), rel=1e-12)
    # A release config.json may set another value: it must reach the parameter.
    c = tiny_config(init_logit_scale=float(np.log(1 / 0.05)))
    c.text.width, c.text.context_length, c.clip_dim = 16, 4, 8
    init = jax.jit(functools.partial(VTP(c).init, method=VTP.clip_text))
    assert init(jax.random.key(0), tokens)["params"]["text"]["logit_scale"].value == np.float32(np.log(1 / 0.05))


def test_text_longer_than_context_is_rejected():
    tower = TextTower(width=16, depth=1, num_heads=2, out_dim=8, vocab_size=32, context_length=4)
    with pytest.raises(ValueError, match="length 5 > context_length 4"):
        jax.eval_shape(tower.init, jax.random.key(0), jnp.zeros((1, 5), jnp.int32))


def test_dino_head_matches_numpy(tiny):
    c, params = tiny
    rng = np.random.default_rng(3)
    p = jax.tree.map(lambda a: 0.3 * rng.standard_normal(a.shape), params["dino_head"])
    x = rng.standard_normal((3, WIDTH))

    def head(p):
        return np.asarray(jax.jit(DINOHead(K, 16, 8, 3).apply)({"params": p}, jnp.asarray(x, jnp.float32)))

    out = head(p)
    gelu = lambda a: 0.5 * a * (1 + erf(a / np.sqrt(2)))  # noqa: E731
    z = gelu(x @ p["mlp_0"]["kernel"] + p["mlp_0"]["bias"])
    z = gelu(z @ p["mlp_1"]["kernel"] + p["mlp_1"]["bias"])
    z = l2n(z @ p["mlp_2"]["kernel"] + p["mlp_2"]["bias"])
    v = p["prototypes"] / np.linalg.norm(p["prototypes"], axis=0, keepdims=True)
    assert out.shape == (3, K) and out.dtype == np.float32
    np.testing.assert_allclose(out, z @ v, rtol=1e-4, atol=1e-5)
    assert np.abs(out).max() <= 1 + 1e-6  # cosines
    # Weight norm with its gain fixed at 1: rescaling a prototype column changes nothing.
    scaled = dict(p, prototypes=p["prototypes"] * np.linspace(0.5, 4, K)[None, :])
    np.testing.assert_allclose(head(scaled), out, rtol=1e-5, atol=1e-6)


def test_dino_head_batch_norm_matches_numpy_over_valid_rows():
    """use_bn (DINO's option): each hidden unit normalised over the rows of the call with biased
    batch statistics; rows marked invalid (gathered iBOT padding) neither enter the statistics
    nor change the valid rows' outputs."""
    rng = np.random.default_rng(5)
    head = DINOHead(prototypes=16, hidden_dim=8, bottleneck_dim=4, n_layers=2, use_bn=True)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    shapes = jax.eval_shape(head.init, jax.random.key(0), jnp.asarray(x))["params"]
    p = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                     nn.meta.unbox(shapes))
    valid = np.array([1, 1, 1, 1, 0, 0], bool)
    padded = np.where(valid[:, None], x, 0.0).astype(np.float32)
    out = np.asarray(head.apply({"params": p}, jnp.asarray(padded), jnp.asarray(valid)))
    gelu = lambda a: 0.5 * a * (1 + erf(a / np.sqrt(2)))  # noqa: E731
    h = x[:4] @ p["mlp_0"]["kernel"] + p["mlp_0"]["bias"]
    h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p["bn_0_scale"] + p["bn_0_bias"]
    z = l2n(gelu(h) @ p["mlp_1"]["kernel"] + p["mlp_1"]["bias"])
    v = p["prototypes"] / np.linalg.norm(p["prototypes"], axis=0, keepdims=True)
    np.testing.assert_allclose(out[:4], z @ v, rtol=1e-4, atol=1e-5)
    # Without `valid` all six rows (padding included) are statistics: the valid rows change.
    assert np.abs(np.asarray(head.apply({"params": p}, jnp.asarray(padded)))[:4] - out[:4]).max() > 1e-3


def test_pixel_shuffle_layout():
    """Channel c*p*p + i*p + j of latent position (y, x) lands on pixel (p*y + i, p*x + j),
    colour c. With depth 0 and identity projections the decoder is LayerNorm + shuffle; the
    latents are standardised per position so that LayerNorm leaves them (almost) unchanged."""
    p, h, w = 4, 2, 3
    ch = 3 * p * p
    dec = PixelDecoder(width=ch, depth=0, num_heads=1, patch_size=p)
    lat = np.random.default_rng(4).standard_normal((2, h, w, ch))
    lat = (lat - lat.mean(-1, keepdims=True)) / lat.std(-1, keepdims=True)
    params = {"proj_in": {"kernel": jnp.eye(ch), "bias": jnp.zeros(ch)},
              "norm": {"scale": jnp.ones(ch), "bias": jnp.zeros(ch)},
              "proj_out": {"kernel": jnp.eye(ch), "bias": jnp.zeros(ch)}}
    out = np.asarray(jax.jit(dec.apply)({"params": params}, jnp.asarray(lat, jnp.float32)))
    ref = np.zeros((2, h * p, w * p, 3))
    for b in range(2):
        for y in range(h):
            for x in range(w):
                for c in range(3):
                    for i in range(p):
                        for j in range(p):
                            ref[b, p * y + i, p * x + j, c] = lat[b, y, x, c * p * p + i * p + j]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_modules_standalone_shapes():
    enc = Encoder(patch_size=P, width=WIDTH, depth=1, num_heads=2, n_registers=1)
    feats = jax.eval_shape(lambda: enc.init_with_output(jax.random.key(0), jnp.zeros((2, 8, 12, 3)))[0])
    assert feats["patches"].shape == (2, 2, 3, WIDTH) and feats["registers"].shape == (2, 1, WIDTH)
    dec = PixelDecoder(width=WIDTH, depth=1, num_heads=2, patch_size=P)
    out = jax.eval_shape(lambda: dec.init_with_output(jax.random.key(0), jnp.zeros((2, 2, 3, 64)))[0])
    assert out.shape == (2, 8, 12, 3) and out.dtype == jnp.float32
    tower = TextTower(width=WIDTH, depth=1, num_heads=2, out_dim=CLIP, vocab_size=VOCAB, context_length=CTX)
    out = jax.eval_shape(lambda: tower.init_with_output(jax.random.key(0), jnp.zeros((3, CTX), jnp.int32))[0])
    assert out.shape == (3, CLIP) and out.dtype == jnp.float32
    head = DINOHead(prototypes=K, hidden_dim=16, bottleneck_dim=8)
    out = jax.eval_shape(lambda: head.init_with_output(jax.random.key(0), jnp.zeros((5, WIDTH)))[0])
    assert out.shape == (5, K) and out.dtype == jnp.float32


def test_bfloat16_compute_keeps_float32_params(tiny):
    _, params = tiny
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(param_shapes(tiny_config(dtype="bfloat16"))))
    x = images(2, 16, 16)
    out16, out32 = tiny_paths("bfloat16")(params, x), tiny_paths()(params, x)
    for name in ("latents", "recon", "clip", "head"):
        y, ref = np.asarray(out16[name]), np.asarray(out32[name])
        assert y.dtype == np.float32 and np.isfinite(y).all(), name
        assert 0 < np.linalg.norm(y - ref) < 0.05 * np.linalg.norm(ref), name  # bf16-level drift


def test_unknown_clip_feat_is_rejected(tiny):
    _, params = tiny
    with pytest.raises(ValueError, match="unknown clip_feat 'mean'"):
        _apply(tiny_config(clip_feat="mean"), params, lambda m, a: m.clip_image(m.encode_features(a)), images(1, 8, 8))
