"""FID (Heusel et al. 2017) as pytorch-fid computes it, with statistics streamed over sharded batches.

FID = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to the 2048-d pool
features of pytorch-fid's Inception-v3 (`vtp_jax.models.inception`). The pipeline per batch:

  images (B, H, W, 3) in [0, 1] -> bilinear resize to 299x299 -> 2x - 1 -> Inception -> (B, 2048)
  -> `feature_sums`: count, mean and centred scatter of the valid rows, on device, in one jit
  -> `FeatureStats.update`: merged on the host in float64 (never all features in memory)
  -> `frechet_distance(stats.mu(), stats.sigma(), *load_reference_stats(ref))`.

Reference batches from ADM (guided-diffusion's evaluations) were made with TF's Inception graph,
whose port pytorch-fid says gives slightly different numbers (interpolation and backends); they
are still the usual yardstick.

ADM's evaluator reports two more numbers, also here: sFID, the same distance on spatial features
(`spatial_features`: the `mixed_6/conv` tap, see FIDInceptionV3.pool_and_spatial), and improved
precision / recall (Kynkaanniemi et al. 2019) on the pool features (`precision_recall`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from absl import logging

from vtp_jax import paths
from vtp_jax.checkpoints import load_converted
from vtp_jax.data import files
from vtp_jax.models import inception as inception_lib

__all__ = ["inception_input", "inception_features", "inception_logits", "spatial_features",
           "inception_pool_and_spatial", "load_inception_params", "BatchMoments", "batch_moments", "feature_sums",
           "FeatureStats", "frechet_distance", "sfid", "manifold_radii", "precision_recall", "load_reference_stats",
           "save_stats"]

SPATIAL_DIM = inception_lib.SPATIAL_DIM

INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")

_HOW_TO_CONVERT = (
    f"Make it once (needs torch: pip install 'vtp-jax[torch]'): download pytorch-fid's FID Inception "
    f"weights {INCEPTION_URL}, then run `python -m vtp_jax.checkpoints.torch_convert inception --pth "
    "pt_inception-2015-12-05-6726825d.pth --out inception.msgpack`.")


def inception_input(images):
    """(B, 299, 299, 3) network input: pytorch-fid's F.interpolate(bilinear, align_corners=False)
    to 299x299, then 2x - 1.

    Without antialiasing both torch and jax.image.resize interpolate between the 2 nearest source
    pixels per axis at half-pixel centres, clamped at the borders, up- or down-sampling alike.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"FID Inception needs NHWC RGB images (B, H, W, 3), got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"FID Inception needs float images in [0, 1], got dtype {images.dtype} "
                         "(divide uint8 images by 255)")
    x = images.astype(jnp.float32)
    size = inception_lib.INPUT_SIZE
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)
    return 2.0 * x - 1.0


def inception_features(params, images, dtype=jnp.float32):
    """(B, 2048) float32 FID features of NHWC images in [0, 1] of any size; `dtype`: conv compute."""
    return inception_lib.FIDInceptionV3(dtype).apply({"params": params}, inception_input(images))


def inception_logits(params, images, dtype=jnp.float32):
    """(B, 1008) float32 logits of the same network (the Inception Score's classifier)."""
    return inception_lib.FIDInceptionV3(dtype).apply({"params": params}, inception_input(images),
                                                     method="logits")


def inception_pool_and_spatial(params, images, dtype=jnp.float32):
    """((B, 2048) FID features, (B, 2023) sFID features) of NHWC images in [0, 1], in one pass."""
    pool, spatial = inception_lib.FIDInceptionV3(dtype).apply({"params": params}, inception_input(images),
                                                              method="pool_and_spatial")
    return pool, _flatten_spatial(spatial)


def spatial_features(params, images, dtype=jnp.float32):
    """(B, 2023) sFID features as ADM's evaluator takes them: `mixed_6/conv` (Mixed_6d's 1x1 branch,
    17 x 17 x 192 at 299 px), its first 7 channels, flattened row, column, channel (TF's NHWC)."""
    return inception_pool_and_spatial(params, images, dtype)[1]


def _flatten_spatial(spatial):
    return spatial[..., :inception_lib.SPATIAL_CHANNELS].reshape(spatial.shape[0], -1)


def load_inception_params(path: str):
    """The FID Inception params from a converted file, checked against the module's shapes."""
    return load_converted(path, inception_lib.param_shapes(), "FID Inception-v3", _HOW_TO_CONVERT)


class BatchMoments(NamedTuple):
    """Sufficient statistics of one batch's valid rows."""

    count: jax.Array  # () number of valid rows
    mean: jax.Array  # (D,) their mean
    scatter: jax.Array  # (D, D) sum over them of (f - mean)(f - mean)^T


def batch_moments(features, valid) -> BatchMoments:
    """Count, mean and centred scatter of the rows of `features` (B, D) where `valid` (B,) is True.

    Centring on the batch mean before the float32 outer products is what keeps them exact enough:
    raw sums of f f^T would cancel catastrophically in S - n mu mu^T when features share a large
    offset. Batches are merged exactly, in float64, by `FeatureStats.update`.
    """
    if features.ndim != 2 or valid.shape != features.shape[:1]:
        raise ValueError(f"batch_moments needs features (B, D) and valid (B,), got {features.shape} "
                         f"and {valid.shape}")
    features = features.astype(jnp.float32)
    keep = valid.astype(bool)[:, None]
    count = jnp.sum(keep, dtype=jnp.float32)
    mean = jnp.sum(jnp.where(keep, features, 0.0), axis=0) / jnp.maximum(count, 1.0)
    centred = jnp.where(keep, features - mean, 0.0)  # where, not *: padding rows may hold NaNs.
    scatter = jnp.matmul(centred.T, centred, precision=jax.lax.Precision.HIGHEST)
    return BatchMoments(count, mean, scatter)


@functools.partial(jax.jit, static_argnames="dtype")
def feature_sums(params, images, valid, dtype=jnp.float32) -> BatchMoments:
    """`batch_moments` of the Inception features of one batch, in one program.

    Pass `images` and `valid` as global arrays sharded over the batch axes ("data", "fsdp") and
    `params` replicated (device_put once with NamedSharding(mesh, P())): the reductions over the
    batch then become all-reduces and the result is replicated, on one host or many, so every
    process can read it. `valid` marks the real rows of a padded last batch.
    """
    return batch_moments(inception_features(params, images, dtype), valid)


class FeatureStats:
    """Mean and covariance of a stream of features from per-batch `BatchMoments`, in float64.

    Batches are merged with the pairwise update of Chan, Golub & LeVeque (1979):
    n = na + nb, mean = ma + (mb - ma) nb / n, M2 = M2a + M2b + (mb - ma)(mb - ma)^T na nb / n.
    """

    def __init__(self, dim: int = inception_lib.FEATURE_DIM):
        self.dim = dim
        self.count = 0
        self._mean = np.zeros(dim)
        self._scatter = np.zeros((dim, dim))

    def update(self, moments) -> None:
        count, mean, scatter = (np.asarray(a, np.float64) for a in moments)
        if count.shape != () or mean.shape != (self.dim,) or scatter.shape != (self.dim, self.dim):
            raise ValueError(f"FeatureStats(dim={self.dim}).update needs (count (), mean ({self.dim},), "
                             f"scatter ({self.dim}, {self.dim})), got shapes {count.shape}, {mean.shape}, "
                             f"{scatter.shape}")
        n = int(round(float(count)))
        if n == 0:
            return
        total = self.count + n
        delta = mean - self._mean
        self._mean += delta * (n / total)
        self._scatter += scatter + np.outer(delta, delta) * (self.count * n / total)
        self.count = total

    def mu(self) -> np.ndarray:
        if self.count < 1:
            raise ValueError("FeatureStats.mu: no features seen yet")
        return self._mean.copy()

    def sigma(self) -> np.ndarray:
        """Unbiased covariance (np.cov(features, rowvar=False))."""
        if self.count < 2:
            raise ValueError(f"FeatureStats.sigma needs at least 2 features, got {self.count}")
        return self._scatter / (self.count - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Squared Frechet distance of N(mu1, sigma1) and N(mu2, sigma2), exactly as pytorch-fid.

    sqrtm(sigma1 sigma2) in float64; a non-finite result (nearly singular product) is retried with
    eps I added to both covariances; an imaginary part above 1e-3 on the diagonal is an error,
    a smaller one is rounding and dropped.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: means must be vectors of equal length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    bad = [f"{name} has shape {s.shape}" for name, s in (("sigma1", sigma1), ("sigma2", sigma2)) if s.shape != (d, d)]
    if bad:
        raise ValueError(f"frechet_distance: covariances must be ({d}, {d}) to match the means: " + "; ".join(bad))
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        logging.warning("frechet_distance: singular product; adding %g to the diagonal of both covariances", eps)
        offset = eps * np.eye(d)
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: sqrtm(sigma1 @ sigma2) has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g}; are both covariances positive semi-definite?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def sfid(fake, real) -> float:
    """sFID of two sets of `spatial_features` (N, 2023): the Frechet distance of the Gaussians
    fitted to them (mean, np.cov), as ADM's evaluator computes it from its mu_s / sigma_s."""
    fake, real = (np.asarray(a, np.float64) for a in (fake, real))
    return frechet_distance(fake.mean(0), np.cov(fake, rowvar=False), real.mean(0), np.cov(real, rowvar=False))


# ----------------------------------------------------------------------------------------------
# Improved precision and recall (Kynkaanniemi et al. 2019), as ADM's ManifoldEstimator.
# ----------------------------------------------------------------------------------------------
def _sq_distances(a, b):
    """(R, C) squared Euclidean distances |a|^2 - 2 a.b + |b|^2, clamped at 0 (ADM's DistanceBlock)."""
    ab = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(jnp.sum(a * a, -1)[:, None] - 2 * ab + jnp.sum(b * b, -1)[None], 0.0)


def _blocks(features, block_size: int):
    """(n_blocks, block, D) float32 zero-padded rows and the (n_blocks, block) mask of real ones."""
    x = np.asarray(features, np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    n = len(x)
    block_size = max(1, min(block_size, n))  # no padding a small set up to a large block
    n_blocks = max(1, -(-n // block_size))
    x = np.pad(x, ((0, n_blocks * block_size - n), (0, 0)))
    return x.reshape(n_blocks, block_size, -1), (np.arange(n_blocks * block_size) < n).reshape(n_blocks, block_size)


@functools.partial(jax.jit, static_argnames="k")
def _kth_distances(blocks, valid, k: int):
    def per_row_block(rows):
        def per_col_block(best, cols):
            d = jnp.where(cols[1][None], _sq_distances(rows, cols[0]), jnp.inf)
            return -jax.lax.top_k(-jnp.concatenate([best, d], axis=1), k + 1)[0], None

        best, _ = jax.lax.scan(per_col_block, jnp.full((rows.shape[0], k + 1), jnp.inf), (blocks, valid))
        return best[:, k]

    return jax.lax.map(per_row_block, blocks)


@jax.jit
def _inside(eval_blocks, ref_blocks, ref_radii):
    def per_row_block(rows):
        def per_col_block(inside, cols):
            return inside | jnp.any(_sq_distances(rows, cols[0]) <= cols[1][None], axis=1), None

        inside, _ = jax.lax.scan(per_col_block, jnp.zeros(rows.shape[0], bool), (ref_blocks, ref_radii))
        return inside

    return jax.lax.map(per_row_block, eval_blocks)


def manifold_radii(features, k: int = 3, block_size: int = 4096) -> np.ndarray:
    """(N,) squared distance of each feature vector to its k-th nearest neighbour in the set (itself
    excluded: ADM takes entry k of each sorted row, entry 0 being the point itself)."""
    blocks, valid = _blocks(features, block_size)
    if valid.sum() <= k:
        raise ValueError(f"manifold_radii needs more than k={k} feature vectors, got {int(valid.sum())}")
    return np.asarray(_kth_distances(jnp.asarray(blocks), jnp.asarray(valid), k)).reshape(-1)[valid.reshape(-1)]


def _coverage(eval_features, ref_features, ref_radii, block_size):
    """Fraction of eval vectors within the radius of at least one reference vector."""
    e, e_valid = _blocks(eval_features, block_size)
    r, r_valid = _blocks(ref_features, block_size)
    radii = np.full(r_valid.size, -np.inf, np.float32)  # padding contains nothing
    radii[r_valid.reshape(-1)] = ref_radii
    inside = np.asarray(_inside(jnp.asarray(e), jnp.asarray(r), jnp.asarray(radii.reshape(r_valid.shape))))
    return float(inside[e_valid].mean())


def precision_recall(real, fake, k: int = 3, block_size: int = 4096) -> tuple[float, float]:
    """Improved precision and recall of `fake` against `real` (N, D) features, as ADM's evaluator.

    Each set's manifold is the union of balls around its vectors, of radius the distance to the
    k-th nearest neighbour in the same set; precision is the fraction of fake vectors inside the
    real manifold, recall the fraction of real ones inside the fake manifold (a point on a sphere
    counts as inside). Distances are computed in float32 blocks of block_size x block_size (ADM
    tries float16 first). Returns (precision, recall).
    """
    real, fake = np.asarray(real, np.float32), np.asarray(fake, np.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall needs (N, D) features of equal D, got {real.shape} and {fake.shape}")
    radii_real, radii_fake = manifold_radii(real, k, block_size), manifold_radii(fake, k, block_size)
    return (_coverage(fake, real, radii_real, block_size), _coverage(real, fake, radii_fake, block_size))


def _check_stats(mu, sigma, dim, source):
    if mu.ndim != 1 or (dim is not None and mu.shape[0] != dim) or sigma.shape != (mu.shape[0],) * 2:
        want = "D" if dim is None else str(dim)
        raise ValueError(f"{source}: expected mu ({want},) and sigma ({want}, {want}), got mu {mu.shape} "
                         f"and sigma {sigma.shape}")


def load_reference_stats(path: str, dim: int | None = inception_lib.FEATURE_DIM, spatial: bool = False):
    """(mu, sigma) in float64 from an .npz with keys 'mu' and 'sigma' (with `spatial`, sFID's 'mu_s'
    and 'sigma_s', 2023-d): an ADM reference batch (its images 'arr_0' are not read here) or a
    `save_stats` file."""
    keys = ("mu_s", "sigma_s") if spatial else ("mu", "sigma")
    if spatial and dim == inception_lib.FEATURE_DIM:
        dim = SPATIAL_DIM
    if not paths.isfile(path):
        raise FileNotFoundError(f"FID reference statistics {path!r} do not exist (an ADM reference batch "
                                "such as VIRTUAL_imagenet256_labeled.npz, or a file written by save_stats)")
    with files.NpzArchive(path) as archive:  # checked: no pickle, no header claiming more than the file holds
        missing = [k for k in keys if k not in archive.files]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(missing)}; it has {archive.files}, FID "
                             f"statistics need {keys[0]!r} (D,) and {keys[1]!r} (D, D)")
        mu, sigma = np.asarray(archive[keys[0]], np.float64), np.asarray(archive[keys[1]], np.float64)
    _check_stats(mu, sigma, dim, path)
    return mu, sigma


def save_stats(path: str, mu, sigma, mu_s=None, sigma_s=None) -> None:
    """Write (mu, sigma), and sFID's (mu_s, sigma_s) if given, as an .npz in the ADM
    reference-batch format."""
    arrays = dict(mu=mu, sigma=sigma) if mu_s is None else dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    arrays = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
    _check_stats(arrays["mu"], arrays["sigma"], None, "save_stats")
    if mu_s is not None:
        _check_stats(arrays["mu_s"], arrays["sigma_s"], None, "save_stats (spatial)")
    with paths.open_file(path, "wb") as f:  # a file object keeps np.savez from appending '.npz' to the name.
        np.savez(f, **arrays)
