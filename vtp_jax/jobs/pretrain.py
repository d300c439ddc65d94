"""Job `pretrain`: VTP pre-training, one jitted step that optimizes
L_total = l_rec * L_rec + l_ssl * L_ssl + l_clip * L_clip.

Each objective's loss is differentiated on its own (its forward pass is disjoint from the others'
apart from the shared parameters), which costs nothing extra and yields per-loss gradient norms;
an objective with weight 0 is not traced at all. The job brings its state (student, EMA teacher,
AdamW, DINO / iBOT centers), its step, the grain pipeline and its hooks (reconstructions, the
release-format export); `vtp_jax.train.runner` does the rest.
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
from absl import logging

from vtp_jax import config as config_lib
from vtp_jax import images, objectives, paths, sharding
from vtp_jax.checkpoints import released, tokenizers
from vtp_jax.data import pipeline, tokenizer
from vtp_jax.models.vtp import VTP
from vtp_jax.train import optim, runner

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


def default_config() -> ml_collections.ConfigDict:
    return config_lib.tokenizer_config("pretrain")


def teacher_of(params):
    return {k: params[k] for k in TEACHER_MODULES if k in params}


def validate(config: ml_collections.ConfigDict, n_batch_shards: int, n_processes: int = 1) -> list[str]:
    d, o, m = config.data, config.objectives, config.model
    errs = []
    on = config_lib.active(config)
    if not any(on.values()):
        errs.append("all objective weights (objectives.l_rec / l_ssl / l_clip) are 0: nothing to train")
    for name in ("batch_clip", "batch_ssl", "batch_rec"):
        b = d[name]
        if b % n_batch_shards or b % n_processes:
            errs.append(f"data.{name}={b} is not divisible by the {n_batch_shards} batch shards of the mesh "
                        f"(data x fsdp) and the {n_processes} processes")
    for name in ("batch_ssl", "batch_rec"):
        if d[name] > d.batch_clip:
            errs.append(f"data.{name}={d[name]} > data.batch_clip={d.batch_clip}: sub-batches are drawn from the CLIP batch")
    for name in ("image_size", "global_crops_size", "local_crops_size"):
        if d[name] % m.patch_size:
            errs.append(f"data.{name}={d[name]} is not a multiple of model.patch_size={m.patch_size}")
    if on["clip"] and not m.text.depth:
        errs.append("objectives.l_clip > 0 needs a text tower (model.text.depth > 0)")
    if on["clip"]:
        try:
            tokenizer.find_vocab_file()
        except FileNotFoundError as e:
            errs.append(f"objectives.l_clip > 0 needs the CLIP BPE vocabulary: {e}")
    if on["clip"] and d.context_length != m.text.context_length:
        errs.append(f"data.context_length={d.context_length} != model.text.context_length={m.text.context_length}")
    if on["ssl"] and not m.head.prototypes:
        errs.append("objectives.l_ssl > 0 needs a DINO head (model.head.prototypes > 0)")
    if on["rec"] and not m.decoder.depth:
        errs.append("objectives.l_rec > 0 needs a pixel decoder (model.decoder.depth > 0)")
    if o.centering not in ("centering", "sinkhorn_knopp"):
        errs.append(f"objectives.centering={o.centering!r}: expected 'centering' or 'sinkhorn_knopp'")
    if d.source == "array_record" and not d.paths:
        errs.append("data.paths is empty: give the ArrayRecord shards (--config.data.paths='gs://bucket/data/*.array_record'; "
                    "docs/data.md makes them)")
    errs += lpips_errors(config)
    return errs


def lpips_errors(config) -> list[str]:
    o = config.objectives
    if o.l_rec > 0 and o.lpips_weight and not paths.exists(o.lpips_params):
        return [f"objectives.lpips_weight={o.lpips_weight} but objectives.lpips_params={o.lpips_params!r} does not "
                "exist: convert the VGG16 + LPIPS weights with `python -m vtp_jax.checkpoints.torch_convert lpips` "
                "(docs/training.md, \"LPIPS weights\") or set objectives.lpips_weight=0"]
    return []


def load_lpips(config, mesh):
    """Replicated LPIPS weights when L_rec uses them, else None (an argument of the step, never a
    closure, so the weights are not baked into the compiled program)."""
    o = config.objectives
    if not (o.l_rec > 0 and o.lpips_weight):
        return None
    return jax.device_put(objectives.load_lpips_params(o.lpips_params), sharding.replicated(mesh))


def init_state(config, model: VTP, tx: optax.GradientTransformation, rng) -> TrainState:
    """Boxed (logically annotated) state; unbox with nn.meta.unbox. The boxes go through `tx.init`,
    so AdamW's moments carry their parameter's axis names (and its sharding) as the teacher does."""
    init_rng, rng = jax.random.split(rng)
    size = config.data.image_size
    params = model.init(init_rng, jnp.zeros((1, size, size, 3), jnp.float32))["params"]
    k = max(config.model.head.prototypes, 1)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      teacher_params=teacher_of(params), opt_state=tx.init(params),
                      dino_center=jnp.zeros((1, k)), ibot_center=jnp.zeros((1, k)), rng=rng)


def batch_spec(config, n: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch contract between the data pipeline and the step (global shapes, or per process
    with n = process count). Everything is batch-major, multi-crop arrays (B, crops, ...), so that
    merging images and crops into one batch axis is a free reshape of the batch-sharded array."""
    d, p = config.data, config.model.patch_size
    on = config_lib.active(config)
    f32, spec = jnp.float32, {}
    if on["clip"]:
        spec["clip_images"] = jax.ShapeDtypeStruct((d.batch_clip // n, d.image_size, d.image_size, 3), f32)
        spec["tokens"] = jax.ShapeDtypeStruct((d.batch_clip // n, d.context_length), jnp.int32)
    if on["ssl"]:
        b, g, l = d.batch_ssl // n, d.global_crops_size, d.local_crops_size
        spec["ssl_global"] = jax.ShapeDtypeStruct((b, 2, g, g, 3), f32)
        spec["ssl_local"] = jax.ShapeDtypeStruct((b, d.local_crops_number, l, l, 3), f32)
        spec["ssl_masks"] = jax.ShapeDtypeStruct((b, 2, g // p, g // p), jnp.bool_)
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


def _entropy(p):
    return -jnp.sum(p * jnp.log(jnp.clip(p, 1e-12)), axis=-1)


def _mean_entropy(probs):
    """Mean per-row entropy over the rows that hold a distribution (gathered iBOT padding rows are 0)."""
    valid = jnp.sum(probs, axis=-1) > 0.5
    return jnp.sum(jnp.where(valid, _entropy(probs), 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def ssl_diagnostics(student_logits, teacher_probs, student_temp):
    """What DINOv2 users watch, on the cls head outputs of the global crops (crops, B, K),
    student crop i paired with teacher crop 1 - i as in the loss.

    A collapse to one prototype shows as teacher_batch_entropy -> 0; a collapse to the uniform
    distribution as teacher_entropy -> log K while KL(teacher || student) -> 0 (the student
    copies a target that no longer depends on the image)."""
    k = teacher_probs.shape[-1]
    paired = teacher_probs[::-1]
    log_s = jax.nn.log_softmax(student_logits / student_temp, axis=-1)
    kl = jnp.sum(paired * (jnp.log(jnp.clip(paired, 1e-12)) - log_s), axis=-1)
    winners = jnp.argmax(teacher_probs, axis=-1).reshape(-1)
    return {
        "teacher_entropy": _entropy(teacher_probs).mean(),  # mean per-row entropy, log K = uniform
        "teacher_batch_entropy": _entropy(teacher_probs.mean(axis=(0, 1))),  # of the batch-mean target
        "kl_teacher_student": kl.mean(),
        "prototypes_used": jnp.zeros((k,), jnp.int32).at[winners].set(1).sum(),  # distinct teacher argmaxes
        "student_logit_std": jnp.std(student_logits, axis=-1).mean(),  # spread over prototypes
    }


def _crops_first(x):
    """(B, crops, ...) -> (crops, B, ...): a local transpose of the batch-sharded array."""
    return jnp.swapaxes(x, 0, 1)


def make_train_step(config, model: VTP, tx: optax.GradientTransformation):
    """step(state, batch, lpips_params) -> (state, metrics); pure, jit it with shardings at the
    call site."""
    o = config.objectives
    on = config_lib.active(config)
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
        """Teacher probabilities on the unmasked global crops (no gradient): cls (2, B, K) and
        the gathered masked patches (M, K)."""
        g = batch["ssl_global"]
        b, n_crops = g.shape[:2]
        feats = apply({"params": teacher}, g.reshape(b * n_crops, *g.shape[2:]), method=VTP.encode_features)
        cls_logits = apply({"params": teacher}, feats["cls"], method=VTP.head)
        patches = feats["patches"].reshape(b * n_crops, -1, feats["patches"].shape[-1])
        masks = batch["ssl_masks"].reshape(b * n_crops, -1)
        t_patches, valid, _ = objectives.gather_masked(patches, masks, n_masked)
        patch_logits = apply({"params": teacher}, t_patches, valid, method=VTP.head)
        if o.centering == "sinkhorn_knopp":
            cls_p = objectives.sinkhorn_knopp_teacher(cls_logits, temp)
            patch_p = objectives.sinkhorn_knopp_teacher(patch_logits, temp, valid=valid)
        else:
            cls_p = objectives.softmax_center_teacher(cls_logits, dino_center, temp)
            patch_p = objectives.softmax_center_teacher(patch_logits, ibot_center, temp)
        patch_p = jnp.where(valid[:, None], patch_p, 0.0)  # padding rows hold no distribution
        new_dino_center = objectives.update_center(dino_center, cls_logits, o.center_momentum)
        new_ibot_center = objectives.update_center(ibot_center, patch_logits, o.center_momentum, valid=valid)
        cls_p = _crops_first(cls_p.reshape(b, n_crops, -1))
        return (jax.lax.stop_gradient(cls_p), jax.lax.stop_gradient(patch_p), new_dino_center, new_ibot_center,
                valid.sum())

    def ssl_loss(params, batch, targets, rng, n_masked):
        cls_p, patch_p = targets
        g, m = batch["ssl_global"], batch["ssl_masks"]
        b, n_crops = g.shape[:2]
        r_global, r_local = jax.random.split(rng)
        feats = apply({"params": params}, g.reshape(b * n_crops, *g.shape[2:]), m.reshape(b * n_crops, *m.shape[2:]),
                      o.drop_path_ssl, method=VTP.encode_features, rngs={"drop_path": r_global})
        s_cls = _crops_first(apply({"params": params}, feats["cls"], method=VTP.head).reshape(b, n_crops, -1))
        # DINOv2 pairing: global crop i against the teacher's other crop; locals against both.
        l_dino = sum(objectives.dino_loss(s_cls[i:i + 1], cls_p[n_crops - 1 - i:n_crops - i], o.student_temp)
                     for i in range(n_crops))
        n_terms = n_crops * (n_crops - 1)
        loc = batch.get("ssl_local")
        if loc is not None and loc.shape[1]:
            n_local = loc.shape[1]
            feats_l = apply({"params": params}, loc.reshape(b * n_local, *loc.shape[2:]), None, o.drop_path_ssl,
                            method=VTP.encode_features, rngs={"drop_path": r_local})
            s_loc = _crops_first(apply({"params": params}, feats_l["cls"], method=VTP.head).reshape(b, n_local, -1))
            l_dino = l_dino + objectives.dino_loss(s_loc, cls_p, o.student_temp)
            n_terms += n_local * n_crops
        l_dino = l_dino / n_terms
        patches = feats["patches"].reshape(b * n_crops, -1, feats["patches"].shape[-1])
        s_patches, valid, weights = objectives.gather_masked(patches, m.reshape(b * n_crops, -1), n_masked)
        s_patch_logits = apply({"params": params}, s_patches, valid, method=VTP.head)
        l_ibot = objectives.ibot_patch_loss_gathered(s_patch_logits, patch_p, weights, o.student_temp, n_crops * b)
        cls_tokens = _crops_first(feats["cls"].reshape(b, n_crops, -1))
        l_koleo = sum(objectives.koleo_loss(cls_tokens[i]) for i in range(n_crops))
        loss = o.dino_weight * l_dino + o.ibot_weight * l_ibot + o.koleo_weight * l_koleo
        aux = {"l_dino": l_dino, "l_ibot": l_ibot, "l_koleo": l_koleo}
        aux.update(ssl_diagnostics(jax.lax.stop_gradient(s_cls), cls_p, o.student_temp))
        return loss, aux

    def rec_loss(params, batch, rng, lpips_params):
        x = batch["rec_images"]
        latents = apply({"params": params}, x, method=VTP.encode)
        recon = apply({"params": params}, latents, o.drop_path_rec, method=VTP.decode, rngs={"drop_path": rng})
        # L1 and LPIPS both on [-1, 1] pixels (the taming / LDM convention l_rec's weights assume).
        recon_px, x_px = images.to_lpips_range(recon), images.to_lpips_range(x)
        l1 = objectives.l1_loss(recon_px, x_px).mean()
        parts = {"l_l1": l1, "latent_std": latents.std()}
        loss = o.l1_weight * l1
        if o.lpips_weight:
            lp = objectives.lpips(lpips_params, recon_px, x_px).mean()
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
                           ibot_teacher_entropy=_mean_entropy(patch_p),
                           ibot_masked=batch["ssl_masks"].sum(), ibot_dropped=batch["ssl_masks"].sum() - n_kept)
            total += o.l_ssl * l
        if on["rec"]:
            (l, aux), g = jax.value_and_grad(rec_loss, has_aux=True)(params, batch, r_rec, lpips_params)
            grads.append(jax.tree.map(lambda x: o.l_rec * x, g))
            metrics.update(aux, l_rec=l, grad_norm_rec=optax.tree.norm(grads[-1]))
            total += o.l_rec * l
        grads = jax.tree.map(lambda *g: sum(g), *grads)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if "text" in new_params:  # OpenCLIP clamps the learned scale after each step
            text = {**new_params["text"], "logit_scale": jnp.clip(new_params["text"]["logit_scale"], 0.0, o.logit_scale_max)}
            new_params = {**new_params, "text": text}
        ok = optim.finite(total, opt_state)
        m = momentum(state.step)
        teacher = optax.incremental_update(teacher_of(new_params), state.teacher_params, 1.0 - m)
        keep = lambda new, old: optim.keep_if(ok, new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1, params=keep(new_params, params), opt_state=opt_state,
            teacher_params=keep(teacher, state.teacher_params),
            dino_center=keep(dino_center, state.dino_center), ibot_center=keep(ibot_center, state.ibot_center))
        metrics.update(loss=total, grad_norm=optax.tree.norm(grads), lr=optim.current_lr(opt_state),
                       teacher_momentum=m, **optim.nonfinite_metrics(opt_state))
        return new_state, metrics

    return step


# ------------------------------------------------------------------------------------------------
# The job: state, step, data, hooks.
# ------------------------------------------------------------------------------------------------
def make_job(config: ml_collections.ConfigDict, mesh, workdir: str | None = None) -> runner.Job:
    model_cfg = config_lib.model_config_for(config)
    model = VTP(model_cfg)
    size = config.data.image_size
    abstract_params = nn.meta.unbox(jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]))
    tx = optim.make_optimizer(config.optim, abstract_params, config.train.steps, model_cfg.depth,
                              config.objectives.freeze_last_layer_steps if config_lib.active(config)["ssl"] else 0)

    def data():
        views = [k for k, on in config_lib.active(config).items() if on]  # only what the step consumes
        return pipeline.make_train_iterator(config.data, seed=config.seed, process_index=jax.process_index(),
                                            process_count=jax.process_count(), views=views)

    hooks = []
    if config_lib.active(config)["rec"]:
        reconstruct = jax.jit(lambda p, x: model.apply({"params": p}, model.apply({"params": p}, x, method=VTP.encode),
                                                       method=VTP.decode))  # compiled once, used every images_every

        def write_reconstructions(step, state, batch, writer, workdir):
            x = batch["rec_images"]
            runner.write_image_rows(writer, workdir, step, "reconstructions", x, reconstruct(state.params, x))

        hooks.append(runner.Hook(config.train.images_every, write_reconstructions))

    def start(state):
        return init_from_release(state, config.train.init_from, model_cfg) if config.train.init_from else state

    def export(state, folder):
        tokenizers.export_tokenizer(model_cfg, state.params, folder, config.data.image_size)

    return runner.Job(config=config, init=lambda rng: init_state(config, model, tx, rng),
                      step=make_train_step(config, model, tx), data=data, consts=load_lpips(config, mesh),
                      start=start, hooks=hooks, eval_target=model, export=export, model=model)


def init_from_release(state, folder, model_cfg):
    """Overwrites the student and the teacher with a released VTP's weights. The release must
    describe the same architecture as the config for every part the config trains (one error
    names every differing field); parts the release has no place for (the DINO head) keep their
    fresh init, parts the config does not train (e.g. the text tower of an AE) are not read."""
    rel_cfg, rel = released.load_release(folder, scan_layers=model_cfg.scan_layers)
    diffs = released.architecture_differences(rel_cfg, model_cfg)
    if diffs:
        raise runner.ConfigError(f"train.init_from={folder} describes another architecture than the config:\n  "
                                 + "\n  ".join(diffs))

    def merge(ours, theirs):
        if isinstance(ours, dict):
            return {k: merge(v, theirs[k]) if k in theirs else v for k, v in ours.items()}
        return jax.device_put(jnp.asarray(theirs, ours.dtype), ours.sharding)

    params = merge(state.params, rel)
    logging.info("initialised from released checkpoint %s", folder)
    # The teacher is a copy: the step donates both pytrees, so they must not share buffers.
    return state.replace(params=params, teacher_params=jax.tree.map(jnp.copy, teacher_of(params)))
