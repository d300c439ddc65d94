"""LPIPS ("lin" v0.1, VGG16 backbone) in Flax: the perceptual half of the VTP reconstruction loss.

The network follows Zhang et al. 2018 exactly so that converted weights give the published
distances: a fixed scaling layer, the ImageNet VGG16 conv trunk tapped after relu1_2, relu2_2,
relu3_3, relu4_3 and relu5_3, channel-wise unit normalization, squared differences, a learned
non-negative 1x1 projection per tap (no bias), a spatial mean and a sum over taps. Weights are
never trained here; they come from `python -m vtp_jax.checkpoints.torch_convert lpips`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

Dtype = Any

# Output widths of the convs of each VGG16 block; a 2x2 max-pool precedes blocks 2-5.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# The ReLU after each block's last conv: the five LPIPS taps.
LPIPS_TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
# The LPIPS scaling layer maps [-1, 1] RGB to roughly ImageNet-standardized inputs.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORMALIZE_EPS = 1e-10
MIN_SIZE = 16  # four 2x2 pools must leave at least one pixel at relu5_3.


class VGG16Features(nn.Module):
    """The VGG16 conv trunk up to relu5_3; returns the five LPIPS taps (NHWC)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        taps = []
        for b, widths in enumerate(VGG16_BLOCKS, start=1):
            if b > 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            for i, width in enumerate(widths, start=1):
                conv = nn.Conv(width, (3, 3), padding=1, dtype=self.dtype, param_dtype=jnp.float32,
                               name=f"conv{b}_{i}")
                x = nn.relu(conv(x))
            taps.append(x)
        return taps


def _unit_channels(f):
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + NORMALIZE_EPS)


class LPIPS(nn.Module):
    """d(x, y) per image for NHWC RGB images in [-1, 1]; the VGG runs once on [x; y]."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, y):
        check_images(x, y)
        b = x.shape[0]
        both = jnp.concatenate([x, y]).astype(jnp.float32)
        both = (both - jnp.array(LPIPS_SHIFT)) / jnp.array(LPIPS_SCALE)
        taps = VGG16Features(self.dtype, name="vgg")(both.astype(self.dtype))
        distance = jnp.zeros((b,), jnp.float32)
        for name, f in zip(LPIPS_TAPS, taps):
            f = _unit_channels(f.astype(jnp.float32))
            sq = jnp.square(f[:b] - f[b:])
            lin = nn.Dense(1, use_bias=False, param_dtype=jnp.float32, name=f"lin_{name}")
            distance = distance + jnp.mean(lin(sq)[..., 0], axis=(1, 2))
        return distance


def check_images(x, y):
    """Reject inputs that would silently give a wrong distance (NCHW, grey, mismatched, tiny)."""
    if x.shape != y.shape:
        raise ValueError(f"LPIPS needs images of equal shape, got {x.shape} and {y.shape}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"LPIPS needs NHWC RGB images (B, H, W, 3), got shape {x.shape}")
    if min(x.shape[1:3]) < MIN_SIZE:
        raise ValueError(f"LPIPS needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels (VGG16 pools "
                         f"four times), got {x.shape[1]}x{x.shape[2]}")


def param_shapes() -> dict[str, tuple[int, ...]]:
    """'/'-joined parameter paths -> shapes, derived from the module so files are checked against it."""
    img = jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
    params = jax.eval_shape(LPIPS().init, jax.random.key(0), img, img)["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params, sep="/").items()}

