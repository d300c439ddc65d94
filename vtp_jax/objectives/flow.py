"""Rectified flow (LightningDiT / SiT "Linear" path, velocity prediction) as pure functions.

x_t = t * x1 + (1 - t) * x0 with x0 ~ N(0, I) the noise (t = 0) and x1 the data (t = 1); the
model regresses the constant velocity u = x1 - x0. LightningDiT adds a cosine term over the
channel axis and draws t from a logit-normal; t is used as drawn (no epsilon clipping: the
velocity parametrization of the linear path is stable on all of [0, 1]). Latents are NHWC.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["interpolate", "flow_loss", "sample_logit_normal_t"]

COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default


def _per_sample(t, x):
    return jnp.reshape(t, (-1,) + (1,) * (x.ndim - 1))


def interpolate(x0, x1, t):
    """The point x_t on the straight path from noise x0 (t = 0) to data x1 (t = 1); t is (B,)."""
    t = _per_sample(t, x1).astype(x1.dtype)
    return t * x1 + (1 - t) * x0


def flow_loss(v_pred, x0, x1):
    """(B,) = mean over (H, W, C) of (v - u)^2 + mean over (H, W) of 1 - cos(v, u), u = x1 - x0.

    The cosine is over the channel axis at each position, as torch's cosine_similarity(dim=1) on
    NCHW: each vector is divided by max(||.||, 1e-8). The official trainer adds the two batch
    means with weight 1 : 1, which equals the batch mean of this sum.
    """
    v = v_pred.astype(jnp.float32)
    u = (x1 - x0).astype(jnp.float32)
    mse = jnp.mean(jnp.square(v - u), axis=tuple(range(1, v.ndim)))
    # max(||a||, eps) written so that its gradient is finite at a = 0: a DiT's output is exactly 0
    # at initialization (adaLN-Zero), where the gradient of ||a|| itself is NaN.
    norm = lambda a: jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=-1), COS_EPS ** 2))  # noqa: E731
    cos = jnp.sum(v * u, axis=-1) / (norm(v) * norm(u))
    return mse + jnp.mean(1 - cos, axis=tuple(range(1, cos.ndim)))


def sample_logit_normal_t(rng, shape, mu: float = 0.0, sigma: float = 1.0):
    """t = sigmoid(N(mu, sigma^2)): LightningDiT's `use_lognorm` timesteps (VTP: mu -0.5 / -0.75)."""
    return jax.nn.sigmoid(mu + sigma * jax.random.normal(rng, shape, jnp.float32))
