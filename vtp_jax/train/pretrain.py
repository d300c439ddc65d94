"""VTP pre-training: the train state and the one jitted step that optimizes
L_total = l_rec * L_rec + l_ssl * L_ssl + l_clip * L_clip.

Each objective's loss is differentiated on its own (its forward pass is disjoint from the others'
apart from the shared parameters), which costs nothing extra and yields per-loss gradient norms;
an objective with weight 0 is not traced at all.
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vtp_jax import objectives
from vtp_jax.models.vtp import IMAGENET_MEAN, IMAGENET_STD, VTP
from vtp_jax.train import optim

TEACHER_MODULES = ("trunk", "visual_proj", "dino_head")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    teacher_params: Any  # EMA of the student's trunk, CLIP projection and DINO head
    opt_state: Any
    dino_center: jax.Array  # (1, K) EMA of the teacher's cls logits ('centering')
    ibot_center: jax.Array  # (1, K) same for masked patch logits
    rng: jax.Array


def active(config: ml_collections.ConfigDict) -> dict[str, bool]:
    o = config.objectives
    return {"clip": o.l_clip > 0, "ssl": o.l_ssl > 0, "rec": o.l_rec > 0}


def model_config_for(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The architecture without the parts no active objective trains (text tower, head, decoder)."""
    m = config.model.copy_and_resolve_references()
    on = active(config)
    if not on["clip"]:
        m.text.depth = 0
    if not on["ssl"]:
        m.head.prototypes = 0
    if not on["rec"]:
        m.decoder.depth = 0
    return m


def teacher_of(params):
    return {k: params[k] for k in TEACHER_MODULES if k in params}


def init_state(config, model: VTP, tx: optax.GradientTransformation, rng) -> TrainState:
    """Boxed (logically annotated) state; unbox with nn.meta.unbox."""
    init_rng, rng = jax.random.split(rng)
    size = config.data.image_size
    variables = model.init(init_rng, jnp.zeros((1, size, size, 3), jnp.float32))
    params = nn.meta.unbox(variables["params"])
    k = max(config.model.head.prototypes, 1)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      teacher_params=teacher_of(variables["params"]), opt_state=tx.init(params),
                      dino_center=jnp.zeros((1, k)), ibot_center=jnp.zeros((1, k)), rng=rng)


def batch_spec(config, n: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch contract between the data pipeline and the step (global shapes, or per process
    with n = process count): multi-crop arrays are crop-major, everything else batch-major."""
    d, p = config.data, config.model.patch_size
    on = active(config)
    f32, spec = jnp.float32, {}
    if on["clip"]:
        spec["clip_images"] = jax.ShapeDtypeStruct((d.batch_clip // n, d.image_size, d.image_size, 3), f32)
        spec["tokens"] = jax.ShapeDtypeStruct((d.batch_clip // n, d.context_length), jnp.int32)
    if on["ssl"]:
        b, g, l = d.batch_ssl // n, d.global_crops_size, d.local_crops_size
        spec["ssl_global"] = jax.ShapeDtypeStruct((2, b, g, g, 3), f32)
        spec["ssl_local"] = jax.ShapeDtypeStruct((d.local_crops_number, b, l, l, 3), f32)
        spec["ssl_masks"] = jax.ShapeDtypeStruct((2, b, g // p, g // p), jnp.bool_)
    if on["rec"]:
        spec["rec_images"] = jax.ShapeDtypeStruct((d.batch_rec // n, d.image_size, d.image_size, 3), f32)
    return spec


def synthetic_batch(config, seed: int = 0, n: int = 1) -> dict[str, np.ndarray]:
    """Random data in the batch contract (benchmarks, compile checks, tests of the step)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in batch_spec(config, n).items():
        if s.dtype == jnp.int32:
            out[k] = rng.integers(1, 1000, s.shape).astype(np.int32)
            out[k][:, -1] = 49407  # an EOT in every row
        elif s.dtype == jnp.bool_:  # the masking recipe: some images masked, at most the max ratio
            lo, hi = config.data.mask_ratio_min_max
            masked = rng.random(s.shape[:2]) < config.data.mask_probability
            ratio = rng.uniform(lo, hi, s.shape[:2])[..., None, None]
            out[k] = masked[..., None, None] & (rng.random(s.shape) < ratio)
        else:
            out[k] = rng.standard_normal(s.shape).astype(np.float32)
    return out


def max_masked_patches(config, n_images: int) -> int:
    """Static bound on masked global-crop patches per batch shard, from the masking recipe
    (DINOv2 masks int(n * probability) images with ratios at most mask_ratio_max); the
    dropped count, if the bound is ever exceeded, is reported as a metric."""
    d = config.data
    n_patches = (d.global_crops_size // config.model.patch_size) ** 2
    masked_images = min(n_images, int(np.ceil(n_images * d.mask_probability * 1.25)) + 1)  # slack: shards differ
    return max(1, min(n_images * n_patches, masked_images * int(np.ceil(n_patches * d.mask_ratio_min_max[1]))))


def _to_pixels(x):
    """ImageNet-normalized -> [-1, 1], the LPIPS convention."""
    return ((x * jnp.array(IMAGENET_STD) + jnp.array(IMAGENET_MEAN)) * 2.0 - 1.0)


def _entropy(p):
    return -jnp.sum(p * jnp.log(jnp.clip(p, 1e-12)), axis=-1)


def make_train_step(config, model: VTP, tx: optax.GradientTransformation):
    """step(state, batch, lpips_params) -> (state, metrics); pure, jit it with shardings at the
    call site. LPIPS weights are an argument, not a closure, so they are not baked into the HLO."""
    o = config.objectives
    on = active(config)
    steps = config.train.steps
    momentum = optim.cosine_ramp(o.teacher_momentum, o.teacher_momentum_end, steps)
    teacher_temp = optim.teacher_temp_schedule(o)
    apply = model.apply

    def clip_loss(params, batch, rng):
        feats = apply({"params": params}, batch["clip_images"], None, o.drop_path_clip,
                      method=VTP.encode_features, rngs={"drop_path": rng})
        img = apply({"params": params}, feats, method=VTP.clip_image)
        txt = apply({"params": params}, batch["tokens"], method=VTP.clip_text)
        scale = jnp.exp(jnp.minimum(params["text"]["logit_scale"], o.logit_scale_max))
        return objectives.clip_loss(img, txt, scale), {"logit_scale": scale}

    def ssl_targets(teacher, batch, dino_center, ibot_center, temp, n_masked):
        """Teacher probabilities on the unmasked global crops (no gradient)."""
        g = batch["ssl_global"]
        n_crops, b = g.shape[:2]
        feats = apply({"params": teacher}, g.reshape(n_crops * b, *g.shape[2:]), method=VTP.encode_features)
        cls_logits = apply({"params": teacher}, feats["cls"], method=VTP.head)
        patches = feats["patches"].reshape(n_crops * b, -1, feats["patches"].shape[-1])
        masks = batch["ssl_masks"].reshape(n_crops * b, -1)
        t_patches, valid, _ = objectives.gather_masked(patches, masks, n_masked)
        patch_logits = apply({"params": teacher}, t_patches, method=VTP.head)
        if o.centering == "sinkhorn_knopp":
            cls_p = objectives.sinkhorn_knopp_teacher(cls_logits, temp)
            patch_p = objectives.sinkhorn_knopp_teacher(patch_logits, temp, valid=valid)
        else:
            cls_p = objectives.softmax_center_teacher(cls_logits, dino_center, temp)
            patch_p = objectives.softmax_center_teacher(patch_logits, ibot_center, temp)
        new_dino_center = objectives.update_center(dino_center, cls_logits, o.center_momentum)
        new_ibot_center = objectives.update_center(ibot_center, patch_logits, o.center_momentum, valid=valid)
        return (jax.lax.stop_gradient(cls_p.reshape(n_crops, b, -1)), jax.lax.stop_gradient(patch_p),
                new_dino_center, new_ibot_center, valid.sum())

    def ssl_loss(params, batch, targets, rng, n_masked):
        cls_p, patch_p = targets
        g, m = batch["ssl_global"], batch["ssl_masks"]
        n_crops, b = g.shape[:2]
        r_global, r_local = jax.random.split(rng)
        feats = apply({"params": params}, g.reshape(n_crops * b, *g.shape[2:]), m.reshape(n_crops * b, *m.shape[2:]),
                      o.drop_path_ssl, method=VTP.encode_features, rngs={"drop_path": r_global})
        s_cls = apply({"params": params}, feats["cls"], method=VTP.head).reshape(n_crops, b, -1)
        # DINOv2 pairing: global crop i against the teacher's other crop; locals against both.
        l_dino = sum(objectives.dino_loss(s_cls[i:i + 1], cls_p[n_crops - 1 - i:n_crops - i], o.student_temp)
                     for i in range(n_crops))
        n_terms = n_crops * (n_crops - 1)
        if "ssl_local" in batch and batch["ssl_local"].shape[0]:
            loc = batch["ssl_local"]
            feats_l = apply({"params": params}, loc.reshape(-1, *loc.shape[2:]), None, o.drop_path_ssl,
                            method=VTP.encode_features, rngs={"drop_path": r_local})
            s_loc = apply({"params": params}, feats_l["cls"], method=VTP.head).reshape(loc.shape[0], b, -1)
            l_dino = l_dino + objectives.dino_loss(s_loc, cls_p, o.student_temp)
            n_terms += loc.shape[0] * n_crops
        l_dino = l_dino / n_terms
        patches = feats["patches"].reshape(n_crops * b, -1, feats["patches"].shape[-1])
        s_patches, valid, weights = objectives.gather_masked(patches, m.reshape(n_crops * b, -1), n_masked)
        s_patch_logits = apply({"params": params}, s_patches, method=VTP.head)
        l_ibot = objectives.ibot_patch_loss_gathered(s_patch_logits, patch_p, weights, o.student_temp, n_crops * b)
        cls_tokens = feats["cls"].reshape(n_crops, b, -1)
        l_koleo = sum(objectives.koleo_loss(cls_tokens[i]) for i in range(n_crops))
        loss = o.dino_weight * l_dino + o.ibot_weight * l_ibot + o.koleo_weight * l_koleo
        return loss, {"l_dino": l_dino, "l_ibot": l_ibot, "l_koleo": l_koleo}

    def rec_loss(params, batch, rng, lpips_params):
        x = batch["rec_images"]
        latents = apply({"params": params}, x, method=VTP.encode)
        recon = apply({"params": params}, latents, o.drop_path_rec, method=VTP.decode, rngs={"drop_path": rng})
        l1 = objectives.l1_loss(recon, x).mean()
        parts = {"l_l1": l1, "latent_std": latents.std()}
        loss = o.l1_weight * l1
        if o.lpips_weight:
            lp = objectives.lpips(lpips_params, _to_pixels(recon), _to_pixels(x)).mean()
            parts["l_lpips"] = lp
            loss = loss + o.lpips_weight * lp
        return loss, parts

    def step(state: TrainState, batch: dict, lpips_params=None):
        rng = jax.random.fold_in(state.rng, state.step)
        r_clip, r_ssl, r_rec = jax.random.split(rng, 3)
        params = state.params
        grads, metrics, total = [], {}, 0.0
        dino_center, ibot_center = state.dino_center, state.ibot_center
        if on["clip"]:
            (l, aux), g = jax.value_and_grad(clip_loss, has_aux=True)(params, batch, r_clip)
            grads.append(jax.tree.map(lambda x: o.l_clip * x, g))
            metrics.update(aux, l_clip=l, grad_norm_clip=optax.tree.norm(grads[-1]))
            total += o.l_clip * l
        if on["ssl"]:
            temp = teacher_temp(state.step)
            n_img = batch["ssl_global"].shape[0] * batch["ssl_global"].shape[1]
            n_masked = max_masked_patches(config, n_img)
            cls_p, patch_p, dino_center, ibot_center, n_kept = ssl_targets(
                state.teacher_params, batch, state.dino_center, state.ibot_center, temp, n_masked)
            (l, aux), g = jax.value_and_grad(ssl_loss, has_aux=True)(params, batch, (cls_p, patch_p), r_ssl, n_masked)
            grads.append(jax.tree.map(lambda x: o.l_ssl * x, g))
            metrics.update(aux, l_ssl=l, grad_norm_ssl=optax.tree.norm(grads[-1]), teacher_temp=temp,
                           center_entropy=_entropy(cls_p.mean(axis=(0, 1))),
                           ibot_masked=batch["ssl_masks"].sum(), ibot_dropped=batch["ssl_masks"].sum() - n_kept)
            total += o.l_ssl * l
        if on["rec"]:
            (l, aux), g = jax.value_and_grad(rec_loss, has_aux=True)(params, batch, r_rec, lpips_params)
            grads.append(jax.tree.map(lambda x: o.l_rec * x, g))
            metrics.update(aux, l_rec=l, grad_norm_rec=optax.tree.norm(grads[-1]))
            total += o.l_rec * l
        grads = jax.tree.map(lambda *g: sum(g), *grads)
        if o.freeze_last_layer_steps and "dino_head" in grads:
            frozen = state.step < o.freeze_last_layer_steps
            head = dict(grads["dino_head"])
            head["prototypes"] = jnp.where(frozen, 0.0, head["prototypes"])
            grads = {**grads, "dino_head": head}
        updates, opt_state = tx.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if "text" in new_params:  # OpenCLIP clamps the learned scale after each step
            text = {**new_params["text"], "logit_scale": jnp.clip(new_params["text"]["logit_scale"], 0.0, o.logit_scale_max)}
            new_params = {**new_params, "text": text}
        ok = jnp.isfinite(total) & opt_state.last_finite  # apply_if_finite skipped the update otherwise
        m = momentum(state.step)
        teacher = optax.incremental_update(teacher_of(new_params), state.teacher_params, 1.0 - m)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1, params=keep(new_params, params), opt_state=opt_state,
            teacher_params=keep(teacher, state.teacher_params),
            dino_center=keep(dino_center, state.dino_center), ibot_center=keep(ibot_center, state.ibot_center))
        metrics.update(loss=total, grad_norm=optax.tree.norm(grads), lr=optim.current_lr(opt_state),
                       teacher_momentum=m, nonfinite_in_a_row=opt_state.notfinite_count,
                       nonfinite_total=opt_state.total_notfinite)
        return new_state, metrics

    return step
