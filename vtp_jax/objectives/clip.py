"""OpenCLIP's contrastive loss over the global batch, with O(B_local x B) memory per device.

OpenCLIP's `local_loss` + `gather_with_grad`: every batch shard all-gathers the embeddings, scores
only its own rows against the whole batch and the per-shard sums are added up. Here that is a
`jax.shard_map` over the mesh's batch axes (data, fsdp); the gather's transpose (a reduce-scatter)
carries the gradient back to the shard that owns each row.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vtp_jax.sharding import batch_axes, n_batch_shards, over_batch_shards

__all__ = ["clip_loss"]


def _cross_entropy_sum(img, txt, all_img, all_txt, scale):
    """Sum over the local rows of both directions' CE. The positive pair's logit is each row's own
    pair, so no label offsets are needed. HIGHEST precision: TPUs would otherwise round the float32
    operands to bfloat16, an error that scale (up to 100) amplifies."""
    hi = jax.lax.Precision.HIGHEST
    positive = scale * jnp.sum(img * txt, axis=-1)
    per_image = scale * jnp.matmul(img, all_txt.T, precision=hi)
    per_text = scale * jnp.matmul(txt, all_img.T, precision=hi)
    lse = jax.nn.logsumexp
    return jnp.sum(lse(per_image, axis=-1) - positive) + jnp.sum(lse(per_text, axis=-1) - positive)


def clip_loss(image_emb, text_emb, scale, *, mesh=None):
    """Mean of the image->text and text->image cross-entropies over the global batch.

    image_emb, text_emb: (B, E), L2-normalized, row i of each a positive pair; scale: scalar
    exp(logit_scale), clamped by the caller. Computed in float32 whatever the input dtype. On a mesh
    (`mesh`, else the `jax.set_mesh` context) whose (data, fsdp) axes split the batch, each device
    builds only its (B_local, B) logit blocks; otherwise the plain (B, B) logits.
    """
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"clip_loss: image_emb and text_emb must both be (B, E), got "
                         f"{image_emb.shape} and {text_emb.shape}")
    if jnp.ndim(scale) != 0:
        raise ValueError(f"clip_loss: scale must be a scalar, got shape {jnp.shape(scale)}")
    img, txt = image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    n = img.shape[0]
    mesh, axes = batch_axes(mesh)
    if not axes:
        return _cross_entropy_sum(img, txt, img, txt, scale) / (2 * n)
    shards = n_batch_shards(mesh, axes)
    if n % shards:
        raise ValueError(f"clip_loss: batch {n} is not divisible by the {shards} batch shards of the "
                         f"mesh axes {axes}")

    def local(img, txt, scale):
        all_img = jax.lax.all_gather(img, axes, tiled=True)
        all_txt = jax.lax.all_gather(txt, axes, tiled=True)
        return jax.lax.psum(_cross_entropy_sum(img, txt, all_img, all_txt, scale), axes)

    rows = P(axes)
    total = over_batch_shards(local, mesh, axes, (rows, rows, P()), P())(img, txt, scale)
    return total / (2 * n)
