"""DINO / iBOT projection head (DINOv2; not part of the released VTP weights)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vtp_jax.models.layers import dense, l2_normalize, param_with_axes


class DINOHead(nn.Module):
    """MLP (GELU, no norm) -> L2-normalised bottleneck -> weight-normed prototypes.

    The prototype layer's weight-norm gain is fixed at 1 (DINOv2 freezes weight_g), so logits are
    cosines in [-1, 1]: each prototype column is divided by its own norm. One head serves the cls
    token (DINO) and the masked patch tokens (iBOT).
    """

    prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    n_layers: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.n_layers - 1):
            x = nn.gelu(dense(self.hidden_dim, ("embed", "mlp") if i == 0 else (None, "mlp"),
                              dtype=self.dtype, name=f"mlp_{i}")(x), approximate=False)
        x = dense(self.bottleneck_dim, ("mlp", None) if self.n_layers > 1 else ("embed", None),
                  dtype=self.dtype, name=f"mlp_{self.n_layers - 1}")(x).astype(jnp.float32)
        x = l2_normalize(x)
        v = self.param("prototypes", param_with_axes(nn.initializers.truncated_normal(0.02), (None, "vocab")),
                       (self.bottleneck_dim, self.prototypes), jnp.float32)
        w = l2_normalize(v, axis=0)
        return (x.astype(self.dtype) @ w.astype(self.dtype)).astype(jnp.float32)
