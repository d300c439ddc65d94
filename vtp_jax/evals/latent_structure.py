"""What a generator sees in a tokenizer's latent, beyond linear separability: its spatial structure
(iREPA, Singh et al. 2025, arXiv 2512.10794) and how its variance spreads over channels.

iREPA found across 27 encoders that how patch-token similarities follow the image's layout, not
the encoder's global semantic accuracy, predicts generation quality. Their spatial-structure
metrics, re-derived from the paper's definitions, on (B, h, w, C) token grids:

  * `lds`, local-vs-distant similarity (their headline): per image, the mean cosine similarity of
    4-neighbour token pairs minus the mean over token pairs at Manhattan distance >= far_dist;
  * `cds`, correlation-decay slope: minus the least-squares slope of the mean pair cosine against
    Manhattan distance d = 1..dmax;
  * `rmsc`, RMS spatial contrast: the root mean squared norm of the unit-normalised tokens after
    subtracting their per-image mean (how much tokens differ from their image's average).

And two properties of the latent as a distribution, which a diffusion model must match:
  * `channel_std_*`: the std of each channel over all tokens (mean, and max / min spread: the
    per-channel normalisation the DiT applies divides by these);
  * `effective_rank`: exp of the entropy of the normalised singular values of the centred
    (tokens, C) matrix (Roy and Vetterli, 2007): how many directions the latent really uses.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vtp_jax.data import eval_splits
from vtp_jax.models.vtp import VTP

__all__ = ["spatial_structure", "effective_rank", "Evaluator"]

_HI = jax.lax.Precision.HIGHEST


def _manhattan(h: int, w: int) -> np.ndarray:
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    c = np.stack([yy.ravel(), xx.ravel()], 1)
    return np.abs(c[:, None] - c[None]).sum(-1)


def spatial_structure(z, far_dist: int = 6, dmax: int = 8) -> dict:
    """(B, h, w, C) token grids -> {'lds', 'cds', 'rmsc'}: (B,) each, float32.

    far_dist must be reachable on the grid (<= h + w - 2); a grid without such pairs is an error,
    not a silent zero. cds fits the distances 1..dmax that occur on the grid."""
    b, h, w, c = z.shape
    dist = _manhattan(h, w)
    far = (dist >= far_dist) & (dist > 0)
    if not far.any():
        raise ValueError(f"spatial_structure: no token pairs at Manhattan distance >= far_dist={far_dist} on a "
                         f"{h} x {w} grid (at most {h + w - 2}); lower far_dist")
    u = z.astype(jnp.float32).reshape(b, h * w, c)
    u = u / jnp.maximum(jnp.linalg.norm(u, axis=-1, keepdims=True), 1e-8)
    gram = jnp.einsum("btc,bsc->bts", u, u, precision=_HI)
    local = jnp.sum(gram * (dist == 1), axis=(1, 2)) / (dist == 1).sum()  # each 4-neighbour pair counted twice
    lds = local - jnp.sum(gram * far, axis=(1, 2)) / far.sum()
    ds = np.array([d for d in range(1, dmax + 1) if (dist == d).any()], np.float32)
    means = jnp.stack([jnp.sum(gram * (dist == d), axis=(1, 2)) / (dist == d).sum() for d in ds.astype(int)], 1)
    x0 = ds - ds.mean()
    cds = -(means - means.mean(1, keepdims=True)) @ x0 / max(float(x0 @ x0), 1e-12)
    centred = u - u.mean(axis=1, keepdims=True)
    rmsc = jnp.sqrt(jnp.mean(jnp.sum(centred ** 2, -1), axis=1))
    return {"lds": lds, "cds": cds, "rmsc": rmsc}


def effective_rank(singular_values) -> float:
    """exp(H(p)), p = s / sum(s) (Roy and Vetterli): 1 for a rank-one matrix, n for n equal ones."""
    s = np.asarray(singular_values, np.float64)
    p = s[s > 0] / s[s > 0].sum()
    return float(np.exp(-np.sum(p * np.log(p))))


class Evaluator:
    """The metrics above on the tokenizer's bottleneck latent of a split (its patch-token grid)."""

    @staticmethod
    def defaults():
        c = ml_collections.ConfigDict()
        c.far_dist = 6  # iREPA's 'far' (on their 16 x 16 grids; an 8 x 8 latent still has pairs up to 14)
        c.dmax = 8
        return c

    def __init__(self, model, mesh, e):
        self.e, self.mesh = e, mesh

        def stats(params, batch_images, valid):
            z = model.apply({"params": params}, batch_images, method=VTP.encode)
            per_image = spatial_structure(z, e.far_dist, e.dmax)
            tokens = z.reshape(-1, z.shape[-1]) * jnp.repeat(valid, z.shape[1] * z.shape[2])[:, None]
            out = {k: jnp.sum(jnp.where(valid, v, 0.0)) for k, v in per_image.items()}
            out.update(count=jnp.sum(valid), tokens=jnp.sum(valid) * z.shape[1] * z.shape[2],
                       sum=tokens.sum(0), outer=jnp.einsum("nc,nd->cd", tokens, tokens, precision=_HI))
            return out

        self._stats = jax.jit(stats)

    def run(self, params) -> dict:
        totals = {}
        for b in eval_splits.batches(self.e.data, self.mesh, name="latent_structure"):
            for k, v in jax.device_get(self._stats(params, b["images"], b["valid"])).items():
                totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
        n, tokens = max(float(totals["count"]), 1.0), max(float(totals["tokens"]), 1.0)
        mean = totals["sum"] / tokens
        cov = totals["outer"] / tokens - np.outer(mean, mean)
        std = np.sqrt(np.maximum(np.diag(cov), 0.0))
        singular = np.sqrt(np.maximum(np.linalg.eigvalsh(cov), 0.0))  # of the centred token matrix, up to sqrt(n)
        return {"lds": float(totals["lds"] / n), "cds": float(totals["cds"] / n), "rmsc": float(totals["rmsc"] / n),
                "channel_std_mean": float(std.mean()), "channel_std_spread": float(std.max() / max(std.min(), 1e-12)),
                "effective_rank": effective_rank(singular)}
