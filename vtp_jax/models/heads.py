"""DINO / iBOT projection head (DINOv2; not part of the released VTP weights)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtp_jax.models.layers import dense, l2_normalize, param_with_axes


class DINOHead(nn.Module):
    """MLP (GELU; BatchNorm after each hidden layer with `use_bn`) -> L2-normalised bottleneck ->
    weight-normed prototypes.

    The prototype layer's weight-norm gain is fixed at 1 (DINOv2 freezes weight_g), so logits are
    cosines in [-1, 1]: each prototype column is divided by its own norm. One head serves the cls
    token (DINO) and the masked patch tokens (iBOT).
    """

    prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    n_layers: int = 3
    use_bn: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, valid=None):
        """x (..., D) -> logits (..., K); `valid` (rows,) marks the rows of x (rows, D) that the
        batch statistics of `use_bn` see (gathered iBOT rows end in padding)."""
        for i in range(self.n_layers - 1):
            x = dense(self.hidden_dim, ("embed", "mlp") if i == 0 else (None, "mlp"), dtype=self.dtype,
                      name=f"mlp_{i}")(x)
            if self.use_bn:
                x = self._batch_norm(x, valid, f"bn_{i}")
            x = nn.gelu(x, approximate=False)
        x = dense(self.bottleneck_dim, ("mlp", None) if self.n_layers > 1 else ("embed", None),
                  dtype=self.dtype, name=f"mlp_{self.n_layers - 1}")(x).astype(jnp.float32)
        x = l2_normalize(x)
        # DINOv2 builds this layer after initializing the MLP, so it keeps PyTorch's default Linear
        # init, U(+-1 / sqrt(bottleneck)): 4x the magnitude of the MLP's N(0, 0.02) at bottleneck
        # 256. The scale matters despite the weight norm: Adam moves each entry by ~lr per step, so
        # smaller entries make the prototypes turn (and collapse together) that much faster.
        bound = self.bottleneck_dim ** -0.5
        torch_default = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
        v = self.param("prototypes", param_with_axes(torch_default, (None, "vocab")),
                       (self.bottleneck_dim, self.prototypes), jnp.float32)
        w = l2_normalize(v, axis=0)
        logits = (x.astype(self.dtype) @ w.astype(self.dtype)).astype(jnp.float32)
        # (rows, K) is the largest activation of SSL training (K = 65536): rows follow the batch and
        # K the prototypes' 'tensor' shards, so the softmaxes and cross-entropies over K run
        # sharded (GSPMD all-reduces their sums) instead of gathering whole rows (no-op without rules).
        return nn.with_logical_constraint(logits, ("activation_batch",) + (None,) * (logits.ndim - 2)
                                          + ("activation_vocab",))

    def _batch_norm(self, x, valid, name):
        """DINO's `use_bn`: normalise each hidden unit over all rows of this call (the global batch,
        every crop or masked patch), with batch statistics in the student and the teacher alike and
        no running averages (the head only exists in training). It removes what all images share,
        so the outputs differ per image from the first step (see configs/demo.py)."""
        x32 = x.astype(jnp.float32)
        rows = tuple(range(x.ndim - 1))
        w = jnp.ones(x.shape[:-1] + (1,)) if valid is None else valid.reshape(x.shape[:-1] + (1,)).astype(jnp.float32)
        n = jnp.maximum(w.sum(rows, keepdims=True), 1.0)
        mean = (x32 * w).sum(rows, keepdims=True) / n
        var = (jnp.square(x32 - mean) * w).sum(rows, keepdims=True) / n
        scale = self.param(f"{name}_scale", param_with_axes(nn.initializers.ones, ("norm",)), (x.shape[-1],), jnp.float32)
        bias = self.param(f"{name}_bias", param_with_axes(nn.initializers.zeros, ("norm",)), (x.shape[-1],), jnp.float32)
        return ((x32 - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias).astype(x.dtype)
