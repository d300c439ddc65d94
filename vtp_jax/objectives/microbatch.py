"""Micro-batches of a batch-sharded batch, for exact gradient accumulation.

Micro-batch i of k takes rows i*m .. (i+1)*m - 1 of EVERY batch shard's block (m = B / (S k), S
batch shards of the mesh's (data, fsdp) axes): every device works on every micro-batch, and
slicing one out is a free reshape plus a slice of the local block, with no copy of the whole
batch and no communication. `merge` puts per-micro-batch results (stacked by a scan, (k, B / k,
...)) back in the batch's row order, so whole-batch quantities (CLIP logits, teacher targets,
BatchNorm statistics, KoLeo neighbours) are computed on the same rows as without accumulation.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from vtp_jax.sharding import n_batch_shards

__all__ = ["micro_batch", "merge_micro_batches"]


def _constrain(x):
    """Rows over the batch axes (a no-op outside the trainer's logical-axis rules)."""
    return nn.with_logical_constraint(x, ("activation_batch",) + (None,) * (x.ndim - 1))


def micro_batch(x, i, k: int):
    """Micro-batch i (a traced int) of k of x (B, ...): (B / k, ...), sharded like x's rows."""
    s = n_batch_shards()
    b = x.shape[0]
    if b % (s * k):
        raise ValueError(f"micro_batch: {b} rows are not divisible by {k} micro-batches on each of the "
                         f"{s} batch shards")
    blocks = x.reshape(s, k, b // (s * k), *x.shape[1:])
    return _constrain(jax.lax.dynamic_index_in_dim(blocks, i, axis=1, keepdims=False).reshape(b // k, *x.shape[1:]))


def merge_micro_batches(stacked):
    """(k, B / k, ...) from a scan over `micro_batch(., i, k)` -> (B, ...) in the batch's row order."""
    k, n = stacked.shape[:2]
    s = n_batch_shards()
    if n % s:
        raise ValueError(f"merge_micro_batches: {n} rows per micro-batch are not divisible by the {s} batch shards")
    blocks = stacked.reshape(k, s, n // s, *stacked.shape[2:]).swapaxes(0, 1)
    return _constrain(blocks.reshape(k * n, *stacked.shape[2:]))
