"""Block stacks under nn.scan (model.scan_layers) against the unrolled blocks they replace.

The unrolled path is the one tested against NumPy and the release elsewhere (test_models,
test_released, test_dit); here the same weights, converted with stack_blocks, must give the same
outputs scanned, import / export / lr decay must agree between the layouts, and the scanned
program must not grow with depth.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import vtp_jax
from vtp_jax import config as config_lib
from vtp_jax import sharding
from vtp_jax.checkpoints import lightningdit as ld
from vtp_jax.checkpoints import released
from vtp_jax.models import dit
from vtp_jax.models.layers import stack_blocks, unstack_blocks
from vtp_jax.models.vtp import VTP, Encoder, param_shapes
from vtp_jax.sharding import LOGICAL_RULES
from vtp_jax.train import optim

DEPTH, DEC_DEPTH, TEXT_DEPTH, WIDTH, VOCAB, CTX = 3, 2, 2, 32, 64, 8
TOWERS = {"trunk": DEPTH, "pixel_decoder": DEC_DEPTH, "text": TEXT_DEPTH}


def tiny_config(scan_layers, **overrides):
    c = config_lib.model_config()
    c.patch_size = 4
    c.width, c.depth, c.num_heads, c.qk_norm, c.layerscale = WIDTH, DEPTH, 2, True, 0.1
    c.decoder.width, c.decoder.depth, c.decoder.num_heads = WIDTH, DEC_DEPTH, 2
    c.text.width, c.text.depth, c.text.num_heads = WIDTH, TEXT_DEPTH, 2
    c.text.vocab_size, c.text.context_length = VOCAB, CTX
    c.clip_dim, c.latent_dim, c.head.prototypes = WIDTH, 8, 0  # clip_dim = text width: exportable
    c.scan_layers = scan_layers
    c.update(overrides)
    return c


def random_params(shapes, seed=0):
    """Random float32 values in `shapes` (norm scales near 1): no init compile needed."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        x = 0.1 * rng.standard_normal(s.shape)
        return np.asarray(x + 1 if path[-1].key == "scale" else x, np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def flat(tree):
    return {"/".join(getattr(k, "key", str(k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_trees_equal(a, b, **tol):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys(), sorted(fa.keys() ^ fb.keys())
    for k in fa:
        if tol:
            np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k, **tol)
        else:
            np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.fixture(scope="module")
def unrolled_params():
    return random_params(param_shapes(tiny_config(False)))


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.standard_normal((2, 8, 12, 3)), jnp.float32)  # a 2 x 3 token grid
    latents = jnp.asarray(rng.standard_normal((2, 2, 3, 8)), jnp.float32)
    tokens = jnp.asarray(rng.integers(1, VOCAB, (2, CTX)), jnp.int32)
    return images, latents, tokens


def all_outputs(c, params, layers=(-1, 0)):
    """Every path of the model in one program: features with and without intermediates,
    encode, decode, CLIP image and text."""
    def fn(params, images, latents, tokens):
        def call(m):
            f = m.encode_features(images, return_layers=layers)
            return dict(cls=f["cls"], patches=f["patches"], intermediates=f["intermediates"],
                        intermediate_cls=f["intermediate_cls"], encode=m.encode(images), decode=m.decode(latents),
                        image=m.clip_image(f), text=m.clip_text(tokens))
        return VTP(c).apply({"params": params}, method=call)

    return jax.jit(fn)(params, *inputs())


# ----------------------------------------------------------------------------------------------
# Layouts.
# ----------------------------------------------------------------------------------------------
def test_stack_unstack_round_trip_and_errors(unrolled_params):
    stacked = stack_blocks(unrolled_params)
    for tower, depth in TOWERS.items():
        assert not any(k.startswith("blocks_") for k in stacked[tower])
        kernel = stacked[tower]["blocks"]["attn"]["qkv"]["kernel"]
        assert kernel.shape == (depth,) + unrolled_params[tower]["blocks_0"]["attn"]["qkv"]["kernel"].shape
        np.testing.assert_array_equal(kernel[depth - 1], unrolled_params[tower][f"blocks_{depth - 1}"]["attn"]["qkv"]["kernel"])
    assert_trees_equal(unstack_blocks(stacked), unrolled_params)
    assert_trees_equal(stack_blocks(stacked), stacked)  # already stacked: unchanged

    gap = {"blocks_0": {"w": np.zeros(2)}, "blocks_2": {"w": np.zeros(2)}}
    with pytest.raises(ValueError, match=r"cannot stack blocks \[0, 2\]"):
        stack_blocks(gap)
    with pytest.raises(ValueError, match="differ in structure or shape"):
        stack_blocks({"blocks_0": {"w": np.zeros(2)}, "blocks_1": {"w": np.zeros(3)}})
    with pytest.raises(ValueError, match="leading depth axis"):
        unstack_blocks({"blocks": {"w": np.zeros((2, 4)), "b": np.zeros((3, 4))}})


def test_scanned_params_are_stacked_with_a_layers_axis():
    images = jnp.zeros((1, 8, 8, 3))
    boxed = {s: jax.eval_shape(lambda s=s: VTP(tiny_config(s)).init(jax.random.key(0), images))["params"]
             for s in (False, True)}
    specs = {s: flat(nn.get_partition_spec(b)) for s, b in boxed.items()}
    shapes = {s: flat(nn.meta.unbox(b)) for s, b in boxed.items()}
    assert set(shapes[True]) == set(flat(stack_blocks(random_params(nn.meta.unbox(boxed[False])))))
    n_stacked = 0
    for path, spec in specs[True].items():
        tower, *rest = path.split("/")
        if rest[0] != "blocks":
            assert spec == specs[False][path] and shapes[True][path] == shapes[False][path], path
            continue
        n_stacked += 1
        unrolled = "/".join([tower, "blocks_0", *rest[1:]])
        assert spec == P("layers", *specs[False][unrolled]), path
        assert shapes[True][path].shape == (TOWERS[tower],) + shapes[False][unrolled].shape, path
        assert nn.logical_to_mesh_axes(spec, LOGICAL_RULES)[0] is None  # the depth axis is replicated
    assert n_stacked == sum(1 for p in specs[False] if p.split("/")[1] == "blocks_0")  # every block param
    assert specs[True]["trunk/blocks/attn/qkv/kernel"] == P("layers", "embed", None, "heads", "kv")


# ----------------------------------------------------------------------------------------------
# Forward passes.
# ----------------------------------------------------------------------------------------------
def test_scanned_model_equals_unrolled(unrolled_params):
    """Same weights, every path, intermediates by negative and positive index; the scanned side
    also remats its blocks (the training setting)."""
    want = all_outputs(tiny_config(False), unrolled_params)
    got = all_outputs(tiny_config(True, remat="full"), stack_blocks(unrolled_params))
    assert len(got["intermediates"]) == 2  # blocks 0 and 2, in block order
    assert_trees_equal(got, want, rtol=2e-5, atol=2e-6)
    # The last block's normed output is the final one (an independent check of the pick).
    np.testing.assert_array_equal(got["intermediates"][1], got["patches"])
    np.testing.assert_array_equal(got["intermediate_cls"][1], got["cls"])
    assert not np.allclose(got["intermediates"][0], got["patches"], atol=1e-3)


def test_scanned_model_sharded_by_logical_rules_equals_one_device(unrolled_params):
    """Stacked params placed by LOGICAL_RULES ('layers' replicated, 'embed' over fsdp) on a
    (2, 4, 1) mesh, batch over (data, fsdp): the same features as on one device."""
    c = tiny_config(True)
    params = stack_blocks(unrolled_params)
    images = jnp.asarray(np.random.default_rng(1).standard_normal((8, 8, 12, 3)), jnp.float32)

    def features(p, x):
        f = VTP(c).apply({"params": p}, x, return_layers=(1,), method=VTP.encode_features)
        return f["patches"], f["intermediates"][0]

    want = jax.jit(features)(params, images)
    mesh = sharding.make_mesh((2, 4, 1))
    boxed = jax.eval_shape(lambda: VTP(c).init(jax.random.key(0), images[:1]))["params"]
    shardings = sharding.logical_shardings(boxed, mesh)
    assert shardings["trunk"]["blocks"]["mlp"]["w1"]["kernel"].spec == P(None, "fsdp", "tensor")
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        got = jax.jit(features)(jax.device_put(params, shardings),
                                jax.device_put(images, sharding.batch_sharding(mesh, 4)))
    assert len(got[0].sharding.device_set) == 8
    assert_trees_equal(got, want, rtol=1e-5, atol=1e-6)


def test_drop_path_under_scan_is_random_per_call_and_differentiable(unrolled_params):
    enc = Encoder(WIDTH, DEPTH, 2, patch_size=4, qk_norm=True, layerscale=0.1, remat="full", scan_layers=True)
    params = stack_blocks(unrolled_params)["trunk"]
    images = inputs()[0]

    @jax.jit
    def loss_and_grad(params, rng):
        def loss(p):
            out = enc.apply({"params": p}, images, None, 0.5, rngs={"drop_path": rng})
            return jnp.sum(out["patches"] ** 2), out["patches"]
        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, a), grads = loss_and_grad(params, jax.random.key(1))
    (_, b), _ = loss_and_grad(params, jax.random.key(1))
    (_, c), _ = loss_and_grad(params, jax.random.key(2))
    clean = enc.apply({"params": params}, images)["patches"]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, clean)
    g = grads["blocks"]["mlp"]["w1"]["kernel"]
    assert g.shape[0] == DEPTH and np.isfinite(g).all() and all(np.abs(g[i]).sum() > 0 for i in range(DEPTH))


def test_scanned_program_does_not_grow_with_depth():
    """Forward + backward of the trunk lowered (not compiled) at depth 2 and 8: the scanned
    program stays the size of one block, the unrolled one grows with the blocks."""
    images = jnp.zeros((2, 8, 8, 3))

    def size(depth, scan):
        enc = Encoder(WIDTH, depth, 2, patch_size=4, scan_layers=scan)
        params = jax.eval_shape(lambda: enc.init(jax.random.key(0), images))
        grad = jax.grad(lambda p: jnp.sum(enc.apply(p, images)["patches"]))
        return len(jax.jit(grad).lower(params).as_text())

    assert size(8, True) < 1.05 * size(2, True)
    assert size(8, False) > 2.5 * size(2, False)


# ----------------------------------------------------------------------------------------------
# Release import / export.
# ----------------------------------------------------------------------------------------------
def test_release_round_trip_with_scanned_params(unrolled_params, tmp_path):
    c = tiny_config(True)
    stacked = stack_blocks(unrolled_params)
    released.export_release(c, stacked, str(tmp_path), image_size=8)

    rel_cfg, rel = released.load_release(str(tmp_path), scan_layers=True)
    assert rel_cfg.scan_layers
    assert_trees_equal(rel, stacked)
    assert released.architecture_differences(rel_cfg, c) == []

    pretrained = vtp_jax.load_pretrained(str(tmp_path))  # unrolled, as always
    assert not pretrained.config.scan_layers and "blocks_0" in pretrained.params["trunk"]
    assert_trees_equal(pretrained.params, unrolled_params)
    images, latents, tokens = inputs()
    got = all_outputs(rel_cfg, rel, layers=(-2, 2))
    feats = pretrained.features(images, layers=[-2, 2])
    for k in ("cls", "patches", "intermediates", "intermediate_cls"):
        assert_trees_equal(got[k], feats[k], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got["decode"], pretrained.decode(latents), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got["text"], pretrained.text_features(tokens), rtol=2e-5, atol=2e-6)


# ----------------------------------------------------------------------------------------------
# Layer-wise lr decay.
# ----------------------------------------------------------------------------------------------
def lr_params(seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *s: jnp.asarray(1 + 0.1 * rng.standard_normal(s), jnp.float32)  # noqa: E731
    block = lambda: {"attn": {"qkv": {"kernel": r(4, 3, 2, 2), "bias": r(3, 2, 2)}}, "norm1": {"scale": r(4)}}  # noqa: E731
    return {"trunk": {"patch_embed": {"kernel": r(2, 2, 3, 4)}, "cls_token": r(1, 1, 4), "norm": {"scale": r(4)},
                      **{f"blocks_{i}": block() for i in range(3)}},
            "text": {f"blocks_{i}": block() for i in range(2)}, "dino_head": {"prototypes": r(4, 6)}}


def test_layer_lr_scales_on_stacked_params_equal_per_block_scales():
    unrolled = lr_params()
    stacked = stack_blocks(unrolled)
    s = optim.layer_lr_scales(stacked, depth=3, layer_decay=0.5, patch_embed_mult=0.2)
    np.testing.assert_array_equal(s["trunk"]["blocks"]["attn"]["qkv"]["kernel"],
                                  np.float32([0.125, 0.25, 0.5]).reshape(3, 1, 1, 1, 1))
    np.testing.assert_array_equal(s["trunk"]["blocks"]["norm1"]["scale"], np.float32([0.125, 0.25, 0.5])[:, None])
    assert s["text"]["blocks"]["norm1"]["scale"] == 1.0 and s["trunk"]["patch_embed"]["kernel"] == pytest.approx(0.5 ** 4 * 0.2)
    # Broadcast to the leaves, the stacked scales are the unrolled per-block ones stacked.
    u = optim.layer_lr_scales(unrolled, depth=3, layer_decay=0.5, patch_embed_mult=0.2)
    full = lambda scales, params: jax.tree.map(lambda x, p: np.broadcast_to(np.float32(x), p.shape), scales, params)  # noqa: E731
    assert_trees_equal(full(s, stacked), stack_blocks(full(u, unrolled)))
    with pytest.raises(ValueError, match="expected 4 first"):
        optim.layer_lr_scales(stacked, depth=4, layer_decay=0.5, patch_embed_mult=0.2)


def test_optimizer_update_is_layout_independent():
    o = config_lib.optim_config()
    o.update(lr=1e-2, warmup_steps=0, weight_decay=0.05, weight_decay_end=0.05, layer_decay=0.5,
             patch_embed_lr_mult=0.2, clip_grad=1.0)
    unrolled = lr_params()
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), unrolled)
    updates = {}
    for name, params, g in (("unrolled", unrolled, grads), ("stacked", stack_blocks(unrolled), stack_blocks(grads))):
        tx = optim.make_optimizer(o, params, 10, depth=3)
        u, _ = jax.jit(tx.update)(g, tx.init(params), params)
        updates[name] = u
    assert_trees_equal(updates["stacked"], stack_blocks(updates["unrolled"]), rtol=1e-6, atol=1e-9)
    # Adam's first step is about lr * sign(g), scaled by 0.5 ** (3 - i) in trunk block i.
    step = np.abs(np.asarray(updates["stacked"]["trunk"]["blocks"]["attn"]["qkv"]["kernel"])).mean(axis=(1, 2, 3, 4))
    np.testing.assert_allclose(step, 1e-2 * np.array([0.125, 0.25, 0.5]), rtol=0.05)


# ----------------------------------------------------------------------------------------------
# LightningDiT.
# ----------------------------------------------------------------------------------------------
DIT = dict(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=5)


def test_scanned_lightningdit_equals_unrolled():
    unrolled_model = dit.LightningDiT(**DIT)
    scanned_model = dit.LightningDiT(**DIT, scan_layers=True, remat="full")
    params = random_params(dit.param_shapes(unrolled_model), seed=3)  # adaLN not zero: blocks act
    stacked = stack_blocks(params)
    assert jax.tree.map(np.shape, stacked) == jax.tree.map(lambda s: s.shape, dit.param_shapes(scanned_model))
    boxed = jax.eval_shape(lambda: scanned_model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,)),
                                                      jnp.zeros((1,), jnp.int32)))["params"]
    assert nn.get_partition_spec(boxed)["blocks"]["adaLN_modulation"]["kernel"] == P("layers", "embed", "mlp")

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 4)), jnp.float32)
    t, y = jnp.asarray([0.2, 0.9], jnp.float32), jnp.asarray([1, 5], jnp.int32)
    want = jax.jit(unrolled_model.apply)({"params": params}, x, t, y)
    got = jax.jit(scanned_model.apply)({"params": stacked}, x, t, y)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert np.abs(np.asarray(want)).max() > 1e-2  # the blocks and the final layer are not zero


def test_lightningdit_state_dict_round_trip_with_scan():
    hp = {**DIT, "mlp_ratio": 4.0, "qk_norm": False, "use_rope": True, "learn_sigma": False}
    params = random_params(dit.param_shapes(dit.LightningDiT(**hp)), seed=4)
    official = ld.to_state_dict(hp, params)
    hp_s, stacked = ld.from_state_dict(official, scan_layers=True)
    assert hp_s == {**hp, "scan_layers": True}
    assert_trees_equal(stacked, stack_blocks(params))
    back = ld.to_state_dict(hp_s, stacked)
    assert_trees_equal(back, official)


def test_model_flops_counts_every_scanned_layer_in_closed_form():
    """MFU's numerator: a scan body counts `length` times (XLA's cost analysis counts it once),
    convolutions and cond branches in closed form, shard_map bodies once per device."""
    from vtp_jax.train.runner import model_flops

    b, d, depth = 4, 16, 5
    x, w = jnp.ones((b, d)), jnp.ones((depth, d, d))
    scanned = lambda x, w: jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]  # noqa: E731

    def unrolled(x, w):
        for i in range(depth):
            x = jnp.tanh(x @ w[i])
        return x

    assert model_flops(scanned, x, w) == model_flops(unrolled, x, w) == 2 * b * d * d * depth
    img, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
    conv = lambda a: jax.lax.conv_general_dilated(a, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
    assert model_flops(conv, img) == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)
    branchy = lambda x, w: jax.lax.cond(x[0, 0] > 0, lambda: x @ w[0] @ w[1], lambda: x @ w[0])  # noqa: E731
    assert model_flops(branchy, x, w) == 2 * 2 * b * d * d
    grad = jax.grad(lambda w: jnp.sum(scanned(x, w)))
    assert model_flops(grad, w) == 3 * 2 * b * d * d * depth  # forward + two backward matmuls per layer
    mesh = sharding.make_mesh((8, 1, 1))
    xs = jnp.ones((8 * b, d))
    local = jax.shard_map(lambda a: a @ w[0], mesh=mesh, in_specs=P(("data", "fsdp")), out_specs=P(("data", "fsdp")))
    assert model_flops(local, xs) == 2 * 8 * b * d * d


def test_model_flops_of_the_vtp_forward_do_not_depend_on_scan(unrolled_params):
    from vtp_jax.train.runner import model_flops

    x = inputs()[0]
    counts = [model_flops(lambda p, x, m=VTP(tiny_config(s)): m.apply({"params": p}, x, method=VTP.encode), params, x)
              for s, params in ((False, unrolled_params), (True, stack_blocks(unrolled_params)))]
    assert counts[0] == counts[1] > 0
