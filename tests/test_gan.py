"""GAN losses, the adaptive generator weight and the PatchGAN discriminator against NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from vtp_jax import objectives
from vtp_jax.models.discriminator import PatchDiscriminator


def _logits(seed, shape=(4, 6, 6, 1)):
    return (3.0 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _np_softplus(z):
    z = z.astype(np.float64)
    return -np.log(1.0 / (1.0 + np.exp(-z)))  # -log sigmoid(-(-z)); fine for |z| << 700.


def test_hinge_losses_match_numpy():
    r, f = _logits(0), _logits(1)
    want_d = 0.5 * (np.maximum(0, 1 - r.astype(np.float64)).mean() + np.maximum(0, 1 + f.astype(np.float64)).mean())
    np.testing.assert_allclose(float(objectives.hinge_d_loss(r, f)), want_d, rtol=1e-6)
    np.testing.assert_allclose(float(objectives.hinge_g_loss(f)), -f.astype(np.float64).mean(), rtol=1e-6)
    gr, gf = jax.grad(objectives.hinge_d_loss, argnums=(0, 1))(r, f)
    np.testing.assert_allclose(gr, -0.5 * (r < 1) / r.size, rtol=1e-6)
    np.testing.assert_allclose(gf, 0.5 * (f > -1) / f.size, rtol=1e-6)


def test_non_saturating_losses_match_numpy():
    r, f = _logits(2), _logits(3)
    sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z.astype(np.float64)))  # noqa: E731
    want_d = 0.5 * (-np.log(sigmoid(r)).mean() - np.log(1 - sigmoid(f)).mean())
    np.testing.assert_allclose(float(objectives.non_saturating_d_loss(r, f)), want_d, rtol=1e-5)
    np.testing.assert_allclose(float(objectives.non_saturating_g_loss(f)), -np.log(sigmoid(f)).mean(), rtol=1e-5)
    # d/df E[-log sigmoid(f)] = -(1 - sigmoid(f)) / N: the generator keeps a gradient when D wins.
    g = jax.grad(objectives.non_saturating_g_loss)(f)
    np.testing.assert_allclose(g, -(1 - sigmoid(f)) / f.size, rtol=1e-5, atol=1e-9)


def test_gan_losses_finite_at_extreme_logits():
    big = np.full((2, 3, 3, 1), 1e4, np.float32)
    for fn, args in [(objectives.hinge_d_loss, (big, -big)), (objectives.hinge_d_loss, (-big, big)),
                     (objectives.hinge_g_loss, (big,)), (objectives.non_saturating_d_loss, (big, -big)),
                     (objectives.non_saturating_d_loss, (-big, big)), (objectives.non_saturating_g_loss, (-big,)),
                     (objectives.non_saturating_g_loss, (big,))]:
        value = fn(*args)
        grads = jax.grad(fn, argnums=tuple(range(len(args))))(*args)
        assert np.isfinite(float(value)) and all(np.isfinite(g).all() for g in grads)
    # D perfectly right: no discriminator loss; perfectly wrong: the loss is the logit margin.
    np.testing.assert_allclose(float(objectives.non_saturating_d_loss(big, -big)), 0.0, atol=1e-6)
    np.testing.assert_allclose(float(objectives.non_saturating_d_loss(-big, big)), 1e4, rtol=1e-6)
    np.testing.assert_allclose(float(objectives.non_saturating_g_loss(-big)), 1e4, rtol=1e-6)


def test_adaptive_generator_weight_closed_form():
    rng = np.random.default_rng(4)
    rec = {"kernel": rng.standard_normal((8, 3)).astype(np.float32), "bias": rng.standard_normal(3).astype(np.float32)}
    gan = {"kernel": rng.standard_normal((8, 3)).astype(np.float32), "bias": rng.standard_normal(3).astype(np.float32)}
    norm = lambda t: np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in t.values()))  # noqa: E731
    want = norm(rec) / (norm(gan) + 1e-4)
    np.testing.assert_allclose(float(objectives.adaptive_generator_weight(rec, gan)), want, rtol=1e-6)
    # A plain array works like a one-leaf pytree.
    np.testing.assert_allclose(float(objectives.adaptive_generator_weight(rec["kernel"], gan["kernel"], eps=0.5)),
                               np.linalg.norm(rec["kernel"]) / (np.linalg.norm(gan["kernel"]) + 0.5), rtol=1e-6)
    # A vanishing GAN gradient is clipped at max_weight instead of exploding.
    zero = jax.tree.map(np.zeros_like, gan)
    assert float(objectives.adaptive_generator_weight(rec, zero)) == 1e4
    assert float(objectives.adaptive_generator_weight(rec, zero, max_weight=7.0)) == 7.0
    # The weight is a constant for the optimizer.
    grads = jax.grad(lambda a, b: objectives.adaptive_generator_weight(a, b), argnums=(0, 1))(rec, gan)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def _out_size(n, n_layers):
    for stride in [2] * n_layers + [1, 1]:
        n = (n + 2 - 4) // stride + 1
    return n


@pytest.mark.parametrize("size, expect", [(256, 30), (64, 6)])
def test_discriminator_output_shape(size, expect):
    assert _out_size(size, 3) == expect
    img = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    model = PatchDiscriminator()
    variables = jax.eval_shape(model.init, jax.random.key(0), img)
    out = jax.eval_shape(model.apply, variables, img)
    assert out.shape == (2, expect, expect, 1) and out.dtype == jnp.float32
    # taming's layout with ndf=64: convs 3->64 (bias), 64->128->256->512 (no bias, normed), 512->1.
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables))
    convs = 16 * (3 * 64 + 64 * 128 + 128 * 256 + 256 * 512 + 512 * 1)
    assert n_params == convs + 64 + 1 + 2 * (128 + 256 + 512)


def _np_conv(x, w, b, stride):
    """4x4 conv, padding 1, HWIO weights, float64."""
    win = sliding_window_view(np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (4, 4), axis=(1, 2))
    win = win[:, ::stride, ::stride]  # (B, H', W', C, 4, 4)
    out = np.einsum("bhwcij,ijco->bhwo", win, w)
    return out if b is None else out + b


def _np_group_norm(x, groups, scale, bias, eps=1e-5):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mu = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mu) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def _lrelu(x):
    return np.where(x > 0, x, 0.2 * x)


@pytest.mark.parametrize("norm", ["group", "none"])
def test_discriminator_matches_numpy(norm):
    model = PatchDiscriminator(ndf=4, n_layers=2, norm=norm, norm_groups=2)
    x = np.random.default_rng(5).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    variables = model.init(jax.random.key(1), x)
    assert set(variables) == {"params"}  # pure: no batch statistics to thread through a step.
    # Random norm affine parameters so that a dropped scale / shift would show.
    leaves, tree = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(tree, [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
    got = np.asarray(model.apply({"params": params}, x))

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = _lrelu(_np_conv(x.astype(np.float64), p["conv0"]["kernel"], p["conv0"]["bias"], 2))
    for n, stride in [(1, 2), (2, 1)]:
        conv = p[f"conv{n}"]
        h = _np_conv(h, conv["kernel"], conv.get("bias"), stride)
        if norm == "group":
            assert "bias" not in conv
            h = _np_group_norm(h, 2, p[f"norm{n}"]["scale"], p[f"norm{n}"]["bias"])
        h = _lrelu(h)
    want = _np_conv(h, p["logits"]["kernel"], p["logits"]["bias"], 1)
    assert got.shape == want.shape == (2, _out_size(16, 2), _out_size(16, 2), 1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    bf16 = np.asarray(PatchDiscriminator(ndf=4, n_layers=2, norm=norm, norm_groups=2, dtype=jnp.bfloat16)
                      .apply({"params": params}, x))
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, want, rtol=0.1, atol=0.05 * np.abs(want).max())


def test_discriminator_rejects_bad_settings():
    x = np.zeros((1, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="unknown norm 'batch'"):
        PatchDiscriminator(ndf=8, norm="batch").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="n_layers must be >= 1"):
        PatchDiscriminator(ndf=8, n_layers=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="norm_groups=32"):
        PatchDiscriminator(ndf=8).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="NHWC"):
        PatchDiscriminator(ndf=8).init(jax.random.key(0), x[0])
