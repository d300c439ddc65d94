"""Per-image reconstruction metrics of the release's protocol: PSNR and SSIM.

Both return (B,) so that an evaluator can stream batches, drop padding rows and reduce across
devices itself. LPIPS is `vtp_jax.objectives.reconstruction.lpips`; rFID has its own module.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vtp_jax import images, objectives
from vtp_jax.data import eval_splits
from vtp_jax.evals import evaluator, fid
from vtp_jax.models.vtp import VTP

__all__ = ["psnr", "ssim"]

# torchmetrics' StructuralSimilarityIndexMeasure defaults; it derives the window from sigma as
# int(3.5 sigma + 0.5) * 2 + 1, which is 11 taps for sigma 1.5.
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
_TAPS = int(3.5 * SSIM_SIGMA + 0.5) * 2 + 1
_HALF = _TAPS // 2


def _check_pair(name, x, y):
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"{name} needs two NHWC batches of equal shape, got {x.shape} and {y.shape}")


def psnr(x, y):
    """(B,) PSNR in dB of NHWC images on the UNQUANTIZED [0, 255] scale (peak 255), the MSE taken
    over all pixels and channels of each image, as the release's `calculate_psnr`.

    Identical images give +inf (the release returns float('inf') too); the caller decides whether
    to average them, drop them or cap them."""
    _check_pair("psnr", x, y)
    d = x.astype(jnp.float32) - y.astype(jnp.float32)
    mse = jnp.mean(jnp.square(d), axis=(1, 2, 3))
    return 20 * np.log10(255.0) - 10 * jnp.log10(mse)  # log10(0) = -inf: no NaN, no division


def _gaussian_window() -> np.ndarray:
    """torchmetrics' 1-D window: exp(-d^2 / 2 sigma^2) at integer offsets d, normalized to sum 1;
    its 2-D kernel is the outer product of two of these, so filtering is separable."""
    d = np.arange(_TAPS) - _HALF
    g = np.exp(-0.5 * (d / SSIM_SIGMA) ** 2)
    return (g / g.sum()).astype(np.float32)


def _filter(v, axis):
    """'valid' correlation with the gaussian window along one axis (the window is symmetric)."""
    n = v.shape[axis] - 2 * _HALF
    return sum(float(w) * jax.lax.slice_in_dim(v, i, i + n, axis=axis)
               for i, w in enumerate(_gaussian_window()))


def ssim(x, y, data_range=1.0):
    """(B,) SSIM of NHWC images as torchmetrics (>= 1.5) computes it for each image.

    Gaussian window 11 taps, sigma 1.5, k1 0.01, k2 0.03. Both images are reflect-padded by 5
    pixels (torch 'reflect': the edge pixel is not repeated), filtered per channel, and the SSIM
    map, which then has the input's size, is averaged over all pixels AND channels. (torchmetrics
    < 1.5 cropped 5 pixels off each border of the map before that mean; the release pins no
    version, so it got the current behaviour.) Variances are clamped at 0, the covariance is not.
    Float32 throughout; images must be at least 6 x 6 for the reflection."""
    _check_pair("ssim", x, y)
    if min(x.shape[1:3]) <= _HALF:
        raise ValueError(f"ssim needs images of at least {_HALF + 1} x {_HALF + 1} pixels for its "
                         f"{_HALF}-pixel reflect padding, got {x.shape[1]} x {x.shape[2]}")
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    pad = ((0, 0), (_HALF, _HALF), (_HALF, _HALF), (0, 0))
    x, y = jnp.pad(x, pad, mode="reflect"), jnp.pad(y, pad, mode="reflect")
    maps = jnp.stack([x, y, x * x, y * y, x * y])  # blurred together: one pass of the filter
    mu_x, mu_y, e_xx, e_yy, e_xy = _filter(_filter(maps, 2), 3)
    var_x = jnp.maximum(e_xx - mu_x * mu_x, 0.0)
    var_y = jnp.maximum(e_yy - mu_y * mu_y, 0.0)
    cov = e_xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return jnp.mean(ssim_map, axis=(1, 2, 3))


# ------------------------------------------------------------------------------------------------
# The evaluator: encode -> decode on a split, as the release's tools/ score it.
# ------------------------------------------------------------------------------------------------
class Evaluator:
    """PSNR and SSIM, plus LPIPS (VGG) and rFID (pytorch-fid's Inception) when their weights are
    given, of a tokenizer's reconstructions (encode -> decode) of a split (ADM centre crop).

    Protocol of the release: PSNR per image on unquantized [0, 255] values (the reconstruction
    clipped to the valid range), SSIM torchmetrics-style on [0, 1], LPIPS on [-1, 1], rFID between
    the crops and the reconstructions both as truncated uint8, streamed (no image is written)."""

    @staticmethod
    def defaults():
        import ml_collections

        c = ml_collections.ConfigDict()
        c.prefix = ""  # metrics are `psnr`, `ssim`, `lpips`, `rfid`
        c.lpips_params = ""  # `python -m vtp_jax.checkpoints.torch_convert lpips` output
        c.inception_params = ""  # `python -m vtp_jax.checkpoints.torch_convert inception` output
        return c

    def __init__(self, model, mesh, e):
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        self.e, self.mesh = e, mesh
        replicate = lambda t: jax.device_put(t, NamedSharding(mesh, P()))  # noqa: E731
        self.lpips = None if evaluator.missing_weights("reconstruction", "LPIPS", e.lpips_params, "lpips_params") \
            else replicate(objectives.load_lpips_params(e.lpips_params))
        self.inception = None if evaluator.missing_weights("reconstruction", "Inception", e.inception_params,
                                                           "inception_params") \
            else replicate(fid.load_inception_params(e.inception_params))

        def sums(params, lpips_params, inception_params, batch_images, valid):
            latents = model.apply({"params": params}, batch_images, method=VTP.encode)
            recon = model.apply({"params": params}, latents, method=VTP.decode)
            x, r = images.denormalize(batch_images), jnp.clip(images.denormalize(recon), 0.0, 1.0)
            zero = lambda v: jnp.where(valid, v, 0.0)  # noqa: E731
            out = {"count": jnp.sum(valid), "psnr": jnp.sum(zero(psnr(255 * x, 255 * r))),
                   "ssim": jnp.sum(zero(ssim(x, r)))}
            if lpips_params is not None:
                out["lpips"] = jnp.sum(zero(objectives.lpips(lpips_params, 2 * r - 1, 2 * x - 1)))
            if inception_params is not None:  # both as uint8 images: the crops exactly, the reconstructions truncated
                out["real"] = fid.batch_moments(fid.inception_features(inception_params, jnp.round(255 * x) / 255), valid)
                out["fake"] = fid.batch_moments(fid.inception_features(inception_params, jnp.floor(255 * r) / 255), valid)
            return out

        self._sums = jax.jit(sums)

    def run(self, params) -> dict:
        totals, real, fake = {}, fid.FeatureStats(), fid.FeatureStats()
        for b in eval_splits.batches(self.e.data, self.mesh, name="reconstruction"):
            out = jax.device_get(self._sums(params, self.lpips, self.inception, b["images"], b["valid"]))
            if "real" in out:
                real.update(out.pop("real"))
                fake.update(out.pop("fake"))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        n = max(totals.pop("count"), 1.0)
        result = {k: v / n for k, v in totals.items()}
        if real.count > 1:
            result["rfid"] = fid.frechet_distance(real.mu(), real.sigma(), fake.mu(), fake.sigma())
        return result
