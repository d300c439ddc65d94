"""The optax update and the schedules of the recipe (DINOv2 / OpenCLIP defaults, see configs)."""
from __future__ import annotations

import jax
import ml_collections
import optax

# Parameters that never get weight decay besides vectors and scalars (biases, norms, LayerScale,
# logit scale): learned tokens and position tables.
_NO_DECAY = ("cls_token", "mask_token", "registers", "positional_embedding")


def lr_schedule(o: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, max(steps, o.warmup_steps + 1), o.min_lr)


def cosine_ramp(start: float, end: float, steps: int) -> optax.Schedule:
    """Cosine from start to end over `steps` (used upwards: weight decay, teacher momentum)."""
    return optax.cosine_decay_schedule(start, max(steps, 1), alpha=end / start)


def teacher_temp_schedule(s: ml_collections.ConfigDict) -> optax.Schedule:
    return optax.linear_schedule(s.warmup_teacher_temp, s.teacher_temp, s.warmup_teacher_temp_steps)


def _path_names(path) -> list[str]:
    return [getattr(k, "key", str(k)) for k in path]


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and not set(_path_names(path)) & set(_NO_DECAY), params)


def layer_lr_scales(params, depth: int, layer_decay: float, patch_embed_mult: float):
    """DINOv2's layer-wise lr decay: trunk block i gets decay**(depth - i), its embeddings
    decay**(depth + 1) (times patch_embed_mult for the patch conv); the rest 1."""
    def scale(path, _):
        names = _path_names(path)
        if names[0] != "trunk":
            return 1.0
        block = next((n for n in names if n.startswith("blocks_")), None)
        if block is not None:
            return layer_decay ** (depth - int(block.split("_")[1]))
        if names[1] in ("norm",):
            return 1.0
        return layer_decay ** (depth + 1) * (patch_embed_mult if names[1] == "patch_embed" else 1.0)

    return jax.tree_util.tree_map_with_path(scale, params)


def make_optimizer(o: ml_collections.ConfigDict, params, steps: int, depth: int) -> optax.GradientTransformation:
    """clip -> AdamW (scheduled lr and weight decay, masked) -> layer-wise lr scales, all skipped on
    non-finite gradients (optax.apply_if_finite; the loop aborts after too many in a row)."""
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=lr_schedule(o, steps), b1=o.b1, b2=o.b2, eps=o.eps,
        weight_decay=cosine_ramp(o.weight_decay, o.weight_decay_end, steps), mask=decay_mask(params))
    parts = [optax.clip_by_global_norm(o.clip_grad)] if o.clip_grad else []
    parts.append(adamw)
    if o.layer_decay != 1.0 or o.patch_embed_lr_mult != 1.0:
        scales = layer_lr_scales(params, depth, o.layer_decay, o.patch_embed_lr_mult)
        labels = jax.tree.map(str, scales)
        parts.append(optax.multi_transform({str(s): optax.scale(s) for s in set(jax.tree.leaves(scales))}, labels))
    return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=2 ** 31 - 1)


def current_lr(opt_state) -> jax.Array:
    """The scheduled lr of this step, read from the injected hyperparameters."""
    inner = opt_state.inner_state
    return next(s for s in inner if hasattr(s, "hyperparams")).hyperparams["learning_rate"]
