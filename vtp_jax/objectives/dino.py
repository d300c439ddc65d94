"""DINOv2's self-distillation objectives: DINO (cls token), iBOT (masked patches) and KoLeo.

Teacher targets come from centering (EMA center, softmax) or Sinkhorn-Knopp; the student is
scored by cross-entropy against them at `student_temp`. Everything is computed in float32. Batch
reductions are plain jnp sums, which jit makes global over a sharded batch (DINOv2 all-reduces
them by hand); the two functions that pair rows across the batch (`gather_masked`, `koleo_loss`)
shard_map over the batch axes like `clip_loss`.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vtp_jax.sharding import batch_axes, n_batch_shards, over_batch_shards

__all__ = [
    "softmax_center_teacher", "update_center", "sinkhorn_knopp_teacher", "dino_loss",
    "ibot_patch_loss", "gather_masked", "ibot_patch_loss_gathered", "koleo_loss",
]


def _cross_entropy(teacher_probs, student_logits, student_temp):
    """-sum_k t * log_softmax(s / student_temp) over the last axis."""
    log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
    return -jnp.sum(teacher_probs.astype(jnp.float32) * log_p, axis=-1)


def _check_prototypes(name, teacher_logits, other, other_name):
    if teacher_logits.ndim < 1 or other.shape[-1:] != teacher_logits.shape[-1:]:
        raise ValueError(f"{name}: {other_name} {other.shape} must end in the {teacher_logits.shape[-1:]} "
                         f"prototypes of teacher_logits {teacher_logits.shape}")


def softmax_center_teacher(teacher_logits, center, teacher_temp):
    """softmax((teacher_logits - center) / teacher_temp): teacher_logits (..., K), center (K,) or (1, K)."""
    _check_prototypes("softmax_center_teacher", teacher_logits, center, "center")
    logits = teacher_logits.astype(jnp.float32) - center.astype(jnp.float32)
    return jax.nn.softmax(logits / teacher_temp, axis=-1)


def update_center(center, teacher_logits, momentum, valid=None):
    """center * momentum + batch_mean * (1 - momentum), the mean taken over all leading dims of
    teacher_logits (..., K) and over the global batch; returns center's shape ((K,) or (1, K)).

    valid (teacher_logits.shape[:-1], bool) restricts the mean to real rows, e.g. the masked
    patches from `gather_masked`; with no valid row the center is kept (DINOv2 would produce NaN).
    """
    _check_prototypes("update_center", teacher_logits, center, "center")
    logits = teacher_logits.astype(jnp.float32).reshape(-1, teacher_logits.shape[-1])
    if valid is None:
        mean, seen = logits.mean(axis=0), True
    else:
        if valid.shape != teacher_logits.shape[:-1]:
            raise ValueError(f"update_center: valid {valid.shape} must be teacher_logits' leading "
                             f"shape {teacher_logits.shape[:-1]}")
        keep = valid.reshape(-1, 1)
        count = jnp.sum(keep)
        mean = jnp.sum(jnp.where(keep, logits, 0.0), axis=0) / jnp.maximum(count, 1)
        seen = count > 0
    center = center.astype(jnp.float32)
    return jnp.where(seen, center * momentum + mean * (1.0 - momentum), center)


def sinkhorn_knopp_teacher(teacher_logits, teacher_temp, n_iterations=3, valid=None):
    """DINOv2's Sinkhorn-Knopp targets: (B, K) logits -> (B, K) probabilities, each row summing to 1
    and every prototype receiving an equal share of the global batch.

    DINOv2 works on Q = exp(logits / temp) and alternates prototype sums (then / K) and sample
    sums (then / B), B the global batch, n_iterations times, and returns Q * B. The same steps run
    here in the log domain, which is exact and stays finite for any logits (DINOv2 overflows past
    |logits / temp| ~ 88); its initial division by sum(Q) is dropped because the first prototype
    normalization absorbs any global scale. valid (B,) bool marks real rows (iBOT's gathered masked
    patches, where B counts them); other rows get zero probability.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp_teacher: teacher_logits must be (B, K), got {teacher_logits.shape}")
    n_rows, n_prototypes = teacher_logits.shape
    if valid is None:
        valid = jnp.ones((n_rows,), bool)
    elif valid.shape != (n_rows,):
        raise ValueError(f"sinkhorn_knopp_teacher: valid must be ({n_rows},), got {valid.shape}")
    keep = valid[:, None]
    log_b = jnp.log(jnp.sum(valid).astype(jnp.float32))
    log_q = jnp.where(keep, teacher_logits.astype(jnp.float32) / teacher_temp, 0.0)
    for _ in range(n_iterations):
        log_q = log_q - jax.nn.logsumexp(log_q, axis=0, keepdims=True, where=keep) - math.log(n_prototypes)
        log_q = jnp.where(keep, log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True) - log_b, 0.0)
    return jnp.where(keep, jnp.exp(log_q + log_b), 0.0)


def dino_loss(student_logits, teacher_probs, student_temp):
    """Sum over every (student crop, teacher crop) pair of the batch-mean cross-entropy.

    student_logits (S, B, K), teacher_probs (T, B, K). Cross-entropy is linear in the target, so the
    T teacher crops are summed first instead of forming S x T products."""
    if student_logits.ndim != 3 or teacher_probs.ndim != 3 or student_logits.shape[1:] != teacher_probs.shape[1:]:
        raise ValueError(f"dino_loss: need student_logits (S, B, K) and teacher_probs (T, B, K), got "
                         f"{student_logits.shape} and {teacher_probs.shape}")
    teacher = jnp.sum(teacher_probs.astype(jnp.float32), axis=0)
    return jnp.sum(_cross_entropy(teacher, student_logits, student_temp)) / student_logits.shape[1]


def ibot_patch_loss(student_logits, teacher_probs, masks, student_temp):
    """iBOT's masked-patch loss: each masked patch's cross-entropy weighted by 1 / (masked patches of
    its image), summed, / B, where B counts every image (masked or not), as DINOv2 does.

    student_logits, teacher_probs (B, N, K); masks (B, N) bool."""
    shape = student_logits.shape
    if student_logits.ndim != 3 or teacher_probs.shape != shape or masks.shape != shape[:2]:
        raise ValueError(f"ibot_patch_loss: need logits and probs (B, N, K) and masks (B, N), got "
                         f"{student_logits.shape}, {teacher_probs.shape} and {masks.shape}")
    per_image = 1.0 / jnp.maximum(jnp.sum(masks, axis=-1, keepdims=True), 1)
    ce = _cross_entropy(teacher_probs, student_logits, student_temp)
    return jnp.sum(jnp.where(masks, ce * per_image, 0.0)) / masks.shape[0]


def gather_masked(x, masks, max_masked, *, mesh=None):
    """The masked rows of x, so that the iBOT head runs on masked patches only (as DINOv2 does).

    x (B, N, ...), masks (B, N) bool, max_masked a static bound on masked patches in the batch.
    Returns rows (M, ...), valid (M,) bool and weights (M,) = 1 / (masked patches of the row's
    image) on valid rows, 0 on padding (whose rows are zeros): the inputs of
    `ibot_patch_loss_gathered`, `sinkhorn_knopp_teacher(valid=)` and `update_center(valid=)`.
    Rows are in (image, patch) order. On a mesh whose (data, fsdp) axes split the batch, each of the
    S batch shards gathers its own images into ceil(max_masked / S) rows, M = S * that, and the
    rows stay sharded like the batch; masked patches beyond a (shard's) bound are dropped, so
    the result equals the dense `ibot_patch_loss` exactly when nothing is dropped.
    """
    if masks.ndim != 2 or x.shape[:2] != masks.shape:
        raise ValueError(f"gather_masked: need x (B, N, ...) and masks (B, N), got {x.shape} and {masks.shape}")
    if not isinstance(max_masked, (int, np.integer)) or max_masked < 1:
        raise ValueError(f"gather_masked: max_masked must be a positive static int, got {max_masked!r}")
    max_masked = int(max_masked)
    mesh, axes = batch_axes(mesh)
    if not axes:
        return _gather_masked(x, masks, max_masked)
    shards = n_batch_shards(mesh, axes)
    if masks.shape[0] % shards:
        raise ValueError(f"gather_masked: batch {masks.shape[0]} is not divisible by the {shards} batch "
                         f"shards of the mesh axes {axes}")
    local = functools.partial(_gather_masked, size=-(-max_masked // shards))
    rows = P(axes)
    return over_batch_shards(local, mesh, axes, (rows, rows), (rows, rows, rows))(x, masks)


def _gather_masked(x, masks, size):
    n_patches = masks.shape[1]
    flat = masks.reshape(-1)
    (index,) = jnp.nonzero(flat, size=size, fill_value=0)
    valid = jnp.arange(size) < jnp.sum(flat)
    per_image = 1.0 / jnp.maximum(jnp.sum(masks, axis=1), 1)
    weights = jnp.where(valid, per_image[index // n_patches], 0.0)
    picked = x.reshape(-1, *x.shape[2:])[index]
    rows = jnp.where(valid.reshape(-1, *(1,) * (x.ndim - 2)), picked, jnp.zeros((), x.dtype))
    return rows, valid, weights


def ibot_patch_loss_gathered(student_logits, teacher_probs, weights, student_temp, n_images):
    """`ibot_patch_loss` on rows from `gather_masked`: student_logits, teacher_probs (M, K),
    weights (M,), n_images the B of the dense loss (every image counts)."""
    shape = student_logits.shape
    if student_logits.ndim != 2 or teacher_probs.shape != shape or weights.shape != shape[:1]:
        raise ValueError(f"ibot_patch_loss_gathered: need logits and probs (M, K) and weights (M,), got "
                         f"{student_logits.shape}, {teacher_probs.shape} and {weights.shape}")
    ce = _cross_entropy(teacher_probs, student_logits, student_temp)
    return jnp.sum(jnp.where(weights > 0, ce * weights, 0.0)) / n_images


def koleo_loss(x, eps=1e-8, *, mesh=None):
    """DINOv2's Kozachenko-Leonenko entropy regularizer on x (B, D): rows L2-normalized (eps),
    each row's nearest neighbour by inner product (its own, set to -1, excluded), and
    -mean(log(||x_i - x_nn + eps|| + eps)) (torch's PairwiseDistance adds eps to the difference).

    The neighbours are searched over the global batch (DINOv2 searches each GPU's batch), with
    O(B_local x B) memory on a mesh. With B = 1 the only candidate is the row itself, as in DINOv2:
    the loss is the constant -log(eps * sqrt(D) + eps) with zero gradient.
    """
    if x.ndim != 2:
        raise ValueError(f"koleo_loss: x must be (B, D), got {x.shape}")
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    n = x.shape[0]
    mesh, axes = batch_axes(mesh)
    if not axes:
        return _koleo_sum(x, x, 0, eps) / n
    shards = n_batch_shards(mesh, axes)
    if n % shards:
        raise ValueError(f"koleo_loss: batch {n} is not divisible by the {shards} batch shards of the "
                         f"mesh axes {axes}")

    def local(x):
        everyone = jax.lax.all_gather(x, axes, tiled=True)
        first_row = jax.lax.axis_index(axes) * x.shape[0]
        return jax.lax.psum(_koleo_sum(x, everyone, first_row, eps), axes)

    return over_batch_shards(local, mesh, axes, (P(axes),), P())(x) / n


def _koleo_sum(rows, everyone, first_row, eps):
    """Sum of -log(nn distance + eps) for `rows`, which sit at first_row.. in `everyone`."""
    dots = jnp.matmul(rows, everyone.T, precision=jax.lax.Precision.HIGHEST)
    own = (first_row + jnp.arange(rows.shape[0]))[:, None] == jnp.arange(everyone.shape[0])[None, :]
    neighbour = jnp.argmax(jnp.where(own, -1.0, dots), axis=-1)
    distance = jnp.linalg.norm(rows - everyone[neighbour] + eps, axis=-1)
    return -jnp.sum(jnp.log(distance + eps))
