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
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from absl import logging

from vtp_jax.checkpoints import load_converted
from vtp_jax.models import inception as inception_lib

__all__ = ["inception_input", "inception_features", "inception_logits", "load_inception_params", "BatchMoments",
           "batch_moments", "feature_sums", "FeatureStats", "frechet_distance", "load_reference_stats",
           "save_stats"]

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


def _check_stats(mu, sigma, dim, source):
    if mu.ndim != 1 or (dim is not None and mu.shape[0] != dim) or sigma.shape != (mu.shape[0],) * 2:
        want = "D" if dim is None else str(dim)
        raise ValueError(f"{source}: expected mu ({want},) and sigma ({want}, {want}), got mu {mu.shape} "
                         f"and sigma {sigma.shape}")


def load_reference_stats(path: str, dim: int | None = inception_lib.FEATURE_DIM):
    """(mu, sigma) in float64 from an .npz with keys 'mu' and 'sigma': an ADM reference batch
    (its images 'arr_0' and spatial 'mu_s' / 'sigma_s' are not read) or a `save_stats` file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID reference statistics {path!r} do not exist (an ADM reference batch "
                                "such as VIRTUAL_imagenet256_labeled.npz, or a file written by save_stats)")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # zipfile, pickle and format errors alike.
        raise ValueError(f"{path}: not an .npz archive ({type(e).__name__}: {e})") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single .npy array, expected an .npz archive with 'mu' and 'sigma'")
    with archive:
        missing = [k for k in ("mu", "sigma") if k not in archive.files]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(missing)}; it has {archive.files}, FID "
                             "statistics need 'mu' (D,) and 'sigma' (D, D)")
        mu, sigma = np.asarray(archive["mu"], np.float64), np.asarray(archive["sigma"], np.float64)
    _check_stats(mu, sigma, dim, path)
    return mu, sigma


def save_stats(path: str, mu, sigma) -> None:
    """Write (mu, sigma) as an .npz with keys 'mu' and 'sigma', the ADM reference-batch format."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    _check_stats(mu, sigma, None, "save_stats")
    with open(path, "wb") as f:  # a file object keeps np.savez from appending '.npz' to the name.
        np.savez(f, mu=mu, sigma=sigma)
