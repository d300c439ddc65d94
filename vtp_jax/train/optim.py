"""The optax update and the schedules of the recipe (DINOv2 / OpenCLIP defaults, see configs)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

# Parameters that never get weight decay besides vectors and scalars (norms, LayerScale, logit
# scale): biases of any rank (the fused qkv bias is (3, heads, head_dim)), norm scales, learned
# tokens and position tables.
_NO_DECAY = ("bias", "scale", "cls_token", "mask_token", "registers", "positional_embedding")
# DINOv2's "last layer": the weight-normed prototypes of the DINO / iBOT head.
LAST_LAYER = "prototypes"


def lr_schedule(o: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, max(steps, o.warmup_steps + 1), o.min_lr)


def cosine_ramp(start: float, end: float, steps: int) -> optax.Schedule:
    """end + (start - end) (1 + cos(pi k / steps)) / 2, then end: DINOv2's cosine for weight decay
    and teacher momentum (used upwards). Any endpoints, 0 included."""
    steps = max(steps, 1)

    def schedule(count):
        k = jnp.minimum(jnp.asarray(count, jnp.float32), steps)
        return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * k / steps))

    return schedule


def teacher_temp_schedule(o: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from warmup_teacher_temp to teacher_temp; no warm-up steps means the final
    temperature from step 0 (optax's linear_schedule would hold the initial value instead)."""
    if o.warmup_teacher_temp_steps <= 0:
        return optax.constant_schedule(o.teacher_temp)
    return optax.linear_schedule(o.warmup_teacher_temp, o.teacher_temp, o.warmup_teacher_temp_steps)


def _path_names(path) -> list[str]:
    return [getattr(k, "key", str(k)) for k in path]


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and not set(_path_names(path)) & set(_NO_DECAY), params)


def last_layer_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: _path_names(path)[-1] == LAST_LAYER, params)


def freeze_until(steps: int, mask) -> optax.GradientTransformation:
    """Zero the updates of the `mask`ed parameters for the first `steps` updates.

    DINOv2 freezes the head's last layer by setting its lr to 0: Adam's moments still see its
    gradients, but neither the gradient step nor weight decay moves it (zeroing the gradient
    alone would leave the decay shrinking the prototypes)."""
    return optax.masked(optax.scale_by_schedule(lambda count: (count >= steps).astype(jnp.float32)), mask)


def layer_lr_scales(params, depth: int, layer_decay: float, patch_embed_mult: float):
    """DINOv2's layer-wise lr decay: trunk block i gets decay**(depth - i), its embeddings
    decay**(depth + 1) (times patch_embed_mult for the patch conv); the rest 1. Floats, except
    for a scanned trunk's stacked leaves (trunk/blocks/..., leading depth axis): a float32
    (depth, 1, ..., 1) array of the per-block scales, which broadcasts against the leaf."""
    def scale(path, p):
        names = _path_names(path)
        if names[0] != "trunk":
            return 1.0
        if "blocks" in names:
            if p.shape[:1] != (depth,):
                raise ValueError(f"{'/'.join(names)}: stacked trunk blocks of shape {p.shape}, expected {depth} first")
            per_block = np.asarray(layer_decay, np.float64) ** (depth - np.arange(depth))
            return per_block.astype(np.float32).reshape((depth,) + (1,) * (p.ndim - 1))
        block = next((n for n in names if n.startswith("blocks_")), None)
        if block is not None:
            return layer_decay ** (depth - int(block.split("_")[1]))
        if names[1] in ("norm",):
            return 1.0
        return layer_decay ** (depth + 1) * (patch_embed_mult if names[1] == "patch_embed" else 1.0)

    return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_tree(scales) -> optax.GradientTransformation:
    """Multiplies each update by its leaf of `scales` (a float, or an array that broadcasts
    against it): per-parameter lr factors without one optax partition per distinct value."""
    return optax.stateless(lambda updates, _: jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales))


def make_optimizer(o: ml_collections.ConfigDict, params, steps: int, depth: int,
                   freeze_last_layer_steps: int = 0) -> optax.GradientTransformation:
    """clip -> AdamW (scheduled lr and weight decay, masked) -> layer-wise lr scales -> frozen last
    layer, all skipped on non-finite gradients (optax.apply_if_finite; the loop aborts after too
    many in a row)."""
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=lr_schedule(o, steps), b1=o.b1, b2=o.b2, eps=o.eps,
        weight_decay=cosine_ramp(o.weight_decay, o.weight_decay_end, steps), mask=decay_mask(params))
    parts = [optax.clip_by_global_norm(o.clip_grad)] if o.clip_grad else []
    parts.append(adamw)
    if o.layer_decay != 1.0 or o.patch_embed_lr_mult != 1.0:
        parts.append(scale_by_tree(layer_lr_scales(params, depth, o.layer_decay, o.patch_embed_lr_mult)))
    if freeze_last_layer_steps > 0:
        parts.append(freeze_until(freeze_last_layer_steps, last_layer_mask(params)))
    return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=2 ** 31 - 1)


def finite(loss, *opt_states) -> jax.Array:
    """True when the step is usable: a finite loss and every optimizer's gradients finite."""
    ok = jnp.isfinite(loss)
    for s in opt_states:
        ok = ok & s.last_finite
    return ok


def keep_if(ok, new, old):
    """`new` where `ok`, else `old`, leaf by leaf: `apply_if_finite` already skips the update of a
    non-finite step; this keeps what the step derives besides (EMA, teacher, centers) from it too."""
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def nonfinite_metrics(*opt_states) -> dict:
    """The counters the runner's guard reads: skipped steps in a row (the worst optimizer) and in all."""
    return dict(nonfinite_in_a_row=jnp.max(jnp.stack([s.notfinite_count for s in opt_states])),
                nonfinite_total=sum(s.total_notfinite for s in opt_states))


def current_lr(opt_state) -> jax.Array:
    """The scheduled lr of this step, read from the injected hyperparameters."""
    inner = opt_state.inner_state
    return next(s for s in inner if hasattr(s, "hyperparams")).hyperparams["learning_rate"]
