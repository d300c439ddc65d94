"""ADM's other numbers: sFID's spatial Inception features and improved precision / recall, and the
`generation` evaluator reporting them beside FID and IS.

References, re-derived here: the spatial tap through tests/test_fid.py's float64 NumPy network of
pytorch-fid's FID Inception (random weights in its state-dict layout, torch's bilinear resize)
cut at Mixed_6d's 1x1 branch, first 7 channels, flattened in NHWC order; precision / recall from
the published definition with brute-force distance matrices (Kynkaanniemi et al. 2019 as ADM's
ManifoldEstimator computes it: squared distances, radius = k-th neighbour, sample inside if
within any radius).
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from test_fid import _assert_close, _conv, _images, _np_a, _np_b, _np_c, _np_logits_and_features, _np_stem, \
    _np_torch_bilinear, _random_state_dict, frechet_stand_in
from vtp_jax.checkpoints import torch_convert
from vtp_jax.evals import fid


@pytest.fixture(scope="module")
def weights():
    sd = _random_state_dict()
    return sd, torch_convert.inception_params_from_state_dict(sd)


def np_spatial(x, sd):
    """NumPy float64 FID Inception up to ADM's `mixed_6/conv` = Mixed_6d.branch1x1 (BasicConv2d
    output, after BN and ReLU), its first 7 channels, flattened (row, column, channel)."""
    x = _np_stem(x, sd)
    for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = _np_a(x, sd, m)
    x = _np_b(x, sd, "Mixed_6a")
    for m in ("Mixed_6b", "Mixed_6c"):
        x = _np_c(x, sd, m)
    tap = _conv(x, sd, "Mixed_6d.branch1x1")
    assert tap.shape[1:] == (17, 17, 192)  # at 299 px
    return tap[..., :7].reshape(len(x), -1)


def test_spatial_features_are_the_mixed_6_conv_tap(weights):
    sd, params = weights
    images = _images(np.random.default_rng(11), 2, 37, 50)  # any size: resized to 299 first
    both = jax.jit(lambda p, x: (fid.inception_pool_and_spatial(p, x), fid.spatial_features(p, x)))
    (pool, spatial), alone = both(params, images)
    assert spatial.shape == (2, fid.SPATIAL_DIM) == (2, 2023) and spatial.dtype == jnp.float32
    x = 2 * _np_torch_bilinear(images, 299, 299) - 1
    want = np_spatial(x, sd)
    _assert_close(spatial, want)
    assert np.abs(want[0] - want[1]).max() > 1e-2 * np.abs(want).max()  # the images' features differ
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(spatial))
    # The same pass gives the FID features of the whole network.
    _assert_close(pool, _np_logits_and_features(x, sd)[1])


# ------------------------------------------------------------------------------------------
# Improved precision and recall.
# ------------------------------------------------------------------------------------------
def np_precision_recall(real, fake, k):
    """Brute force in float64: squared distances, radius = k-th smallest distance to the set
    excluding the point itself, a point is inside if within the radius of any point of the other set."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    dist = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)  # noqa: E731
    radius_real = np.sort(dist(real, real), axis=1)[:, k]  # column 0 is the point itself
    radius_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    precision = np.mean(np.any(dist(fake, real) <= radius_real[None], axis=1))
    recall = np.mean(np.any(dist(real, fake) <= radius_fake[None], axis=1))
    return precision, recall, radius_real


@pytest.mark.parametrize("k,block", [(3, 16), (3, 4096), (1, 7), (5, 32)])
def test_precision_recall_match_brute_force(k, block):
    rng = np.random.default_rng(k + block)
    real = rng.standard_normal((57, 6)).astype(np.float32)
    fake = (rng.standard_normal((45, 6)) * 0.8 + 1.0).astype(np.float32)  # narrower, shifted: p and r differ
    want_p, want_r, radius = np_precision_recall(real, fake, k)
    np.testing.assert_allclose(fid.manifold_radii(real, k, block), radius, rtol=1e-5)
    p, r = fid.precision_recall(real, fake, k=k, block_size=block)
    assert (p, r) == (want_p, want_r), ((p, r), (want_p, want_r))
    assert 0 < want_r < 1 and 0 < want_p < 1 and want_p != want_r  # neither trivial nor symmetric


def test_precision_recall_limits_and_errors():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((30, 4)).astype(np.float32)
    assert fid.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert fid.precision_recall(real, real + 100.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than k=3"):
        fid.precision_recall(real[:3], real)
    with pytest.raises(ValueError, match="equal D"):
        fid.precision_recall(real, real[:, :2])


def test_sfid_and_spatial_stats_files(tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((300, 5)), rng.standard_normal((300, 5)) * 1.5 + 0.3
    want = fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fid.sfid(a, b) == pytest.approx(want) and want > 0.1
    mu, sigma = np.zeros(4), np.eye(4)
    fid.save_stats(str(tmp_path / "ref.npz"), mu, sigma, mu + 1, 2 * sigma)
    np.testing.assert_array_equal(fid.load_reference_stats(str(tmp_path / "ref.npz"), dim=4, spatial=True)[1],
                                  2 * sigma)
    fid.save_stats(str(tmp_path / "plain.npz"), mu, sigma)
    with pytest.raises(ValueError, match="missing mu_s, sigma_s"):
        fid.load_reference_stats(str(tmp_path / "plain.npz"), spatial=True)


# ------------------------------------------------------------------------------------------
# The generation evaluator: FID, sFID, IS, precision, recall.
# ------------------------------------------------------------------------------------------
class _NoiseImages:
    """A stand-in generator: smooth images from the noise, on the evaluator's protocol."""

    num_classes, latent_shape = 4, (4, 4, 3)

    def images(self, params, noise, labels):
        del params, labels
        return jax.nn.sigmoid(jax.image.resize(noise, (noise.shape[0], 16, 16, 3), "bilinear"))


def test_generation_evaluator_reports_adms_five_numbers(weights, tmp_path, monkeypatch):
    """Run against real images of a split, then against an ADM-style reference file (mu / sigma,
    mu_s / sigma_s, arr_0 uint8 images) made from the same images: the same numbers, and both
    equal to an independent computation on the gathered features."""
    from vtp_jax.evals import evaluator, generation
    from vtp_jax import sharding
    from vtp_jax.data import eval_splits

    monkeypatch.setattr(fid, "frechet_distance", frechet_stand_in)
    _, params = weights
    torch_convert.save_params(params, str(tmp_path / "inception.msgpack"))
    mesh = sharding.make_mesh((2, 1, 1))
    n, bs = 6, 4  # the last batch of each side is padded
    e = evaluator.resolved(ml_collections.ConfigDict(dict(
        type="generation", num_samples=n, batch_size=bs, inception_params=str(tmp_path / "inception.msgpack"),
        data=dict(source="procedural", procedural_size=16, image_size=16, num_images=n, batch_size=bs))))
    got = generation.GenerationEvaluator(_NoiseImages(), mesh, e).run(None)
    assert set(got) == {"fid", "sfid", "is", "precision", "recall"}

    # Independently: the same fake and real images, their features, then the formulas.
    feats = jax.jit(fid.inception_pool_and_spatial)
    rng, fake_images = np.random.default_rng(e.seed), []
    for start in range(0, n, bs):
        rng.integers(0, 4, bs)  # the labels drawn first
        noise = rng.standard_normal((bs, 4, 4, 3)).astype(np.float32)
        images = np.floor(255 * np.asarray(_NoiseImages().images(None, noise, None))) / 255
        fake_images.append(images[:min(bs, n - start)])
    real_images = np.concatenate([np.asarray(jax.device_get(generation._quantize(b["images"], jnp.round)))[
        np.asarray(b["valid"])] for b in eval_splits.batches(e.data, mesh)])

    def features(images):
        padded = np.concatenate([images, np.zeros((-len(images) % bs, *images.shape[1:]), np.float32)])
        out = [feats(params, padded[i:i + bs]) for i in range(0, len(padded), bs)]
        return [np.concatenate([np.asarray(o[j]) for o in out])[:len(images)].astype(np.float64) for j in range(2)]

    fake, real = features(np.concatenate(fake_images).astype(np.float32)), features(real_images.astype(np.float32))
    stats = lambda x: (x.mean(0), np.cov(x, rowvar=False))  # noqa: E731
    want_p, want_r, _ = np_precision_recall(real[0], fake[0], 3)
    assert got["fid"] == pytest.approx(frechet_stand_in(*stats(fake[0]), *stats(real[0])), rel=1e-4)
    assert got["sfid"] == pytest.approx(frechet_stand_in(*stats(fake[1]), *stats(real[1])), rel=1e-4)
    assert (got["precision"], got["recall"]) == (want_p, want_r)

    # ADM's reference batch layout; `data` now names a split that must not be read.
    ref = str(tmp_path / "VIRTUAL_ref.npz")
    np.savez(ref, arr_0=np.round(real_images * 255).astype(np.uint8), mu=real[0].mean(0),
             sigma=np.cov(real[0], rowvar=False), mu_s=real[1].mean(0), sigma_s=np.cov(real[1], rowvar=False))
    e2 = e.copy_and_resolve_references()
    e2.reference_stats, e2.data.source = ref, "no such source"
    got2 = generation.GenerationEvaluator(_NoiseImages(), mesh, e2).run(None)
    for k in ("fid", "sfid", "is"):
        assert got2[k] == pytest.approx(got[k], rel=1e-4), k
    assert (got2["precision"], got2["recall"]) == (got["precision"], got["recall"])
