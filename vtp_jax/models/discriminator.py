"""PatchGAN discriminator for stage 2 (the N-layer design of pix2pix / taming-transformers).

Layout: conv4x4 s2 + LeakyReLU(0.2); n_layers - 1 times conv4x4 s2 + norm + LeakyReLU with
widths ndf * min(2^n, 8); a stride-1 conv4x4 + norm + LeakyReLU; a stride-1 conv4x4 to one logit
per patch. All convs pad by 1, so a 256 px image gives 30x30 logits with n_layers=3.

Normalization: taming uses BatchNorm, whose running statistics are mutable state that a pure
train step would have to thread through and whose batch statistics couple examples across
data-parallel shards. We default to GroupNorm (per-example, no state, identical on any mesh);
`norm='none'` gives the plain variant. Either way the module has only a 'params' collection.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any
NORMS = ("group", "none")


class PatchDiscriminator(nn.Module):
    """(B, H, W, C) images -> (B, H', W', 1) real/fake logits, one per receptive-field patch."""

    ndf: int = 64
    n_layers: int = 3
    norm: str = "group"
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    def _conv(self, features, stride, use_bias, name):
        # taming initializes conv weights N(0, 0.02) and biases at zero.
        return nn.Conv(features, (4, 4), strides=stride, padding=1, use_bias=use_bias,
                       kernel_init=nn.initializers.normal(0.02), dtype=self.dtype,
                       param_dtype=jnp.float32, name=name)

    def _norm_act(self, x, name):
        if self.norm == "group":
            if x.shape[-1] % self.norm_groups:
                raise ValueError(f"PatchDiscriminator: {x.shape[-1]} channels do not split into "
                                 f"norm_groups={self.norm_groups} groups; change ndf or norm_groups")
            # epsilon 1e-5 as torch.nn.GroupNorm.
            x = nn.GroupNorm(self.norm_groups, epsilon=1e-5, dtype=self.dtype,
                             param_dtype=jnp.float32, name=name)(x)
        return nn.leaky_relu(x, 0.2)

    @nn.compact
    def __call__(self, x):
        if self.norm not in NORMS:
            raise ValueError(f"PatchDiscriminator: unknown norm {self.norm!r}, expected one of {NORMS}")
        if self.n_layers < 1:
            raise ValueError(f"PatchDiscriminator: n_layers must be >= 1, got {self.n_layers}")
        if x.ndim != 4:
            raise ValueError(f"PatchDiscriminator needs NHWC images (B, H, W, C), got shape {x.shape}")
        bias = self.norm == "none"  # a norm's own shift makes a conv bias redundant.
        x = x.astype(self.dtype)
        x = nn.leaky_relu(self._conv(self.ndf, 2, True, "conv0")(x), 0.2)
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            x = self._conv(self.ndf * min(2 ** n, 8), stride, bias, f"conv{n}")(x)
            x = self._norm_act(x, f"norm{n}")
        return self._conv(1, 1, True, "logits")(x).astype(jnp.float32)
