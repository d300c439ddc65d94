"""A small CNN that classifies procedural images by (colour, shape): the domain network that scores
generated images in the miniature study (FID's idea with a network that knows this domain).

Trained on real rendered images, whose true class the generator knows; `features` (the pooled
penultimate layer) are what the study's Frechet distance compares.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vtp_jax.models.layers import param_with_axes


class DomainClassifier(nn.Module):
    """(B, H, W, 3) images in [0, 1] -> (logits (B, classes), features (B, width * 8)).

    A strided 3x3 stem halves the resolution first (colour and shape survive it, and it keeps the
    network cheap enough to train in minutes on a CPU), then three stages of two 3x3 convs, the
    last two downsampling. Three choices make it learn shape, not only colour, in a few hundred
    steps (measured: ~35% -> ~98% top-1 at equal compute):
      * no normalization: GroupNorm's statistics span the whole map, which a small object barely
        touches, so the busy background sets them;
      * features = [mean, max] pooled: the max finds the small object wherever it is (the mean
        alone dilutes it in the background), the mean keeps the scene for the Frechet distance;
      * factorized output: a shape head and a colour head whose log-softmaxes add into the joint
        logits (label = shape * num_colors + colour, as `procedural.label_of`), so each factor
        learns from every image rather than from 1/64 of them.
    """

    num_classes: int = 64
    width: int = 16
    num_colors: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        if self.num_classes % self.num_colors:
            raise ValueError(f"num_classes={self.num_classes} is not shapes x num_colors={self.num_colors}")
        x = images.astype(self.dtype) * 2.0 - 1.0
        for i, (mult, stride) in enumerate(((1, 2), (2, 2), (4, 2))):
            for j in range(2):
                x = nn.Conv(self.width * mult, (3, 3), strides=stride if j == 0 else 1, dtype=self.dtype,
                            param_dtype=jnp.float32,
                            kernel_init=param_with_axes(nn.initializers.he_normal(), (None, None, None, None)),
                            name=f"conv{i}_{j}")(x)
                x = nn.relu(x)
        x = x.astype(jnp.float32)
        features = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)  # global mean and max pool
        head = lambda n, name: nn.log_softmax(nn.Dense(  # noqa: E731
            n, param_dtype=jnp.float32, name=name,
            kernel_init=param_with_axes(nn.initializers.lecun_normal(), (None, None)))(features))
        shape, color = head(self.num_classes // self.num_colors, "shape"), head(self.num_colors, "color")
        logits = (shape[:, :, None] + color[:, None, :]).reshape(len(features), self.num_classes)
        return logits, features
