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
from vtp_jax.models.vtp import VTP, param_shapes
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
    k = config.train.get("accum_steps", 1)
    if not isinstance(k, int) or k < 0:
        errs.append(f"train.accum_steps={k!r}: expected an integer >= 1, or 0 (auto: the compile plan picks it)")
    elif k:
        names = [n for n, view in (("batch_clip", "clip"), ("batch_ssl", "ssl"), ("batch_rec", "rec")) if on[view]]
        if any(d[n] // n_batch_shards % k for n in names):
            errs.append(f"train.accum_steps={k} must divide every per-step batch per batch shard ({n_batch_shards} "
                        "shards of data x fsdp): " + ", ".join(f"data.{n}={d[n]} ({d[n] // n_batch_shards} per shard)"
                                                               for n in names))
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
    if d.source == "array_record" and not d.paths and config_lib.checks_files(config):
        errs.append("data.paths is empty: give the ArrayRecord shards (--config.data.paths='gs://bucket/data/*.array_record'; "
                    "docs/data.md makes them)")
    errs += lpips_errors(config)
    return errs


def lpips_errors(config) -> list[str]:
    o = config.objectives
    if o.l_rec > 0 and o.lpips_weight and config_lib.checks_files(config) and not paths.exists(o.lpips_params):
        return [f"objectives.lpips_weight={o.lpips_weight} but objectives.lpips_params={o.lpips_params!r} does not "
                "exist: convert the VGG16 + LPIPS weights with `python -m vtp_jax.checkpoints.torch_convert lpips` "
                "(docs/training.md, \"LPIPS weights\") or set objectives.lpips_weight=0"]
    return []


def load_lpips(config, mesh, abstract: bool = False):
    """Replicated LPIPS weights when L_rec uses them, else None (an argument of the step, never a
    closure, so the weights are not baked into the compiled program); `abstract`: their shapes."""
    o = config.objectives
    if not (o.l_rec > 0 and o.lpips_weight):
        return None
    if abstract:
        return objectives.abstract_lpips_params(sharding.replicated(mesh))
    return jax.device_put(objectives.load_lpips_params(o.lpips_params), sharding.replicated(mesh))


def accum_choices(config, n_batch_shards: int) -> tuple[int, ...]:
    """The train.accum_steps values that divide every active per-shard batch (validate's rule)."""
    d, on = config.data, config_lib.active(config)
    per_shard = [d[n] // n_batch_shards for n, view in (("batch_clip", "clip"), ("batch_ssl", "ssl"),
                                                        ("batch_rec", "rec")) if on[view]]
    smallest = min(per_shard, default=1)
    return tuple(k for k in range(1, smallest + 1) if all(b % k == 0 for b in per_shard))


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
    call site.

    With train.accum_steps = k > 1 every objective runs over k micro-batches in a `lax.scan` (so
    the activations held at once fall with k) and still yields the whole batch's loss and
    gradient: CLIP and, with a BatchNorm head, SSL by cached trunk outputs (a gradient-free pass
    over the micro-batches, the loss over the whole batch w.r.t. those outputs, then each
    micro-batch again pulling its outputs' gradients back with `jax.vjp`); the teacher's targets
    and centers over the whole batch before any student micro-batch (with centering and no head
    BatchNorm, inside the student's scan: a micro-batch's targets need only the previous center);
    KoLeo over the whole batch's cached cls tokens; reconstruction as the mean of micro-batch
    means. Per-loss gradient norms are of the whole-batch gradients."""
    o = config.objectives
    on = config_lib.active(config)
    steps = config.train.steps
    k = config.train.get("accum_steps", 1)
    momentum = optim.cosine_ramp(o.teacher_momentum, o.teacher_momentum_end, steps)
    teacher_temp = optim.teacher_temp_schedule(o)
    apply = model.apply
    merge = objectives.merge_micro_batches

    def micro(tree, i):
        return jax.tree.map(lambda x: objectives.micro_batch(x, i, k), tree)

    def add(a, b):
        return jax.tree.map(jnp.add, a, b)

    def accumulate(body, init, rng):
        """scan of body(carry, (i, rng_i)) over the k micro-batches, micro-batch i with its own rng."""
        return jax.lax.scan(body, init, (jnp.arange(k), jax.random.split(rng, k)))

    def stacked(fn, rng):
        """fn(i, rng_i) of every micro-batch, stacked (k, ...): forwards without gradient."""
        return accumulate(lambda c, x: (c, fn(*x)), None, rng)[1]

    # ---- CLIP --------------------------------------------------------------------------------
    def clip_embed(params, batch, rng):
        feats = apply({"params": params}, batch["clip_images"], None, o.drop_path_clip,
                      method=VTP.encode_features, rngs={"drop_path": rng})
        img = apply({"params": params}, feats, method=VTP.clip_image)
        txt = apply({"params": params}, batch["tokens"], method=VTP.clip_text)
        return img, txt

    def clip_of_embeddings(img, txt, log_scale):
        scale = jnp.exp(jnp.minimum(log_scale, o.logit_scale_max))
        return objectives.clip_loss(img, txt, scale), {"logit_scale": scale}

    def clip_loss(params, batch, rng):
        return clip_of_embeddings(*clip_embed(params, batch, rng), params["text"]["logit_scale"])

    def clip_grads(params, batch, rng):
        """(L_clip, aux), its gradient: the whole batch at once, or by cached embeddings."""
        if k == 1:
            return jax.value_and_grad(clip_loss, has_aux=True)(params, batch, rng)
        batch = {key: batch[key] for key in ("clip_images", "tokens")}
        img, txt = map(merge, stacked(lambda i, r: clip_embed(params, micro(batch, i), r), rng))
        (l, aux), (d_img, d_txt, d_log_scale) = jax.value_and_grad(clip_of_embeddings, argnums=(0, 1, 2), has_aux=True)(
            img, txt, params["text"]["logit_scale"])

        def body(acc, x):
            i, r = x
            _, pull = jax.vjp(lambda p: clip_embed(p, micro(batch, i), r), params)
            return add(acc, pull((micro(d_img, i), micro(d_txt, i)))[0]), None

        g, _ = accumulate(body, jax.tree.map(jnp.zeros_like, params), rng)
        text = {**g["text"], "logit_scale": g["text"]["logit_scale"] + d_log_scale}
        return (l, aux), {**g, "text": text}

    # ---- DINO / iBOT / KoLeo -----------------------------------------------------------------
    def teacher_features(teacher, batch, n_masked):
        """The teacher trunk on the unmasked global crops: cls (B, crops, D), gathered masked
        patches (M, D) and their validity (M,)."""
        g = batch["ssl_global"]
        b, n_crops = g.shape[:2]
        feats = apply({"params": teacher}, g.reshape(b * n_crops, *g.shape[2:]), method=VTP.encode_features)
        patches = feats["patches"].reshape(b * n_crops, -1, feats["patches"].shape[-1])
        masks = batch["ssl_masks"].reshape(b * n_crops, -1)
        t_patches, valid, _ = objectives.gather_masked(patches, masks, n_masked)
        return {"cls": feats["cls"].reshape(b, n_crops, -1), "patches": t_patches, "valid": valid}

    def ssl_targets(teacher, tf, centers, temp):
        """Teacher probabilities (no gradient) from its trunk outputs `tf`: cls (B, crops, K) and
        the gathered masked patches (M, K); and the teacher's logits (B * crops, K), (M, K)."""
        b, n_crops = tf["cls"].shape[:2]
        valid = tf["valid"]
        cls_logits = apply({"params": teacher}, tf["cls"].reshape(b * n_crops, -1), method=VTP.head)
        patch_logits = apply({"params": teacher}, tf["patches"], valid, method=VTP.head)
        if o.centering == "sinkhorn_knopp":
            cls_p = objectives.sinkhorn_knopp_teacher(cls_logits, temp)
            patch_p = objectives.sinkhorn_knopp_teacher(patch_logits, temp, valid=valid)
        else:
            cls_p = objectives.softmax_center_teacher(cls_logits, centers[0], temp)
            patch_p = objectives.softmax_center_teacher(patch_logits, centers[1], temp)
        patch_p = jnp.where(valid[:, None], patch_p, 0.0)  # padding rows hold no distribution
        targets = jax.lax.stop_gradient(cls_p.reshape(b, n_crops, -1)), jax.lax.stop_gradient(patch_p)
        return targets, (cls_logits, patch_logits)

    def ssl_features(params, batch, rng, n_masked, local=True):
        """The student trunk's outputs that the SSL losses read: cls of the masked global crops
        (B, crops, D), their gathered masked patches (M, D), cls of the local crops (B, locals,
        D); aux: the gathered rows' validity and iBOT weights."""
        g, m = batch["ssl_global"], batch["ssl_masks"]
        b, n_crops = g.shape[:2]
        r_global, r_local = jax.random.split(rng)
        feats = apply({"params": params}, g.reshape(b * n_crops, *g.shape[2:]), m.reshape(b * n_crops, *m.shape[2:]),
                      o.drop_path_ssl, method=VTP.encode_features, rngs={"drop_path": r_global})
        patches = feats["patches"].reshape(b * n_crops, -1, feats["patches"].shape[-1])
        s_patches, valid, weights = objectives.gather_masked(patches, m.reshape(b * n_crops, -1), n_masked)
        out = {"cls": feats["cls"].reshape(b, n_crops, -1), "patches": s_patches}
        loc = batch.get("ssl_local")
        if local and loc is not None and loc.shape[1]:
            n_local = loc.shape[1]
            feats_l = apply({"params": params}, loc.reshape(b * n_local, *loc.shape[2:]), None, o.drop_path_ssl,
                            method=VTP.encode_features, rngs={"drop_path": r_local})
            out["cls_local"] = feats_l["cls"].reshape(b, n_local, -1)
        return out, (valid, weights)

    def koleo(cls):
        """KoLeo of each global crop's cls tokens (B, crops, D), summed over crops."""
        tokens = _crops_first(cls)
        return sum(objectives.koleo_loss(tokens[i]) for i in range(tokens.shape[0]))

    def ssl_head_loss(params, feats, rows, targets, with_koleo=True):
        """L_ssl of the student trunk's outputs (`ssl_features`): the head, DINO, iBOT and, with
        with_koleo, KoLeo over the rows given; aux: the parts and the student's cls logits (B,
        crops, K, no gradient)."""
        valid, weights = rows
        cls_p, patch_p = targets
        b, n_crops = feats["cls"].shape[:2]
        head = lambda x, *a: apply({"params": params}, x, *a, method=VTP.head)  # noqa: E731
        s_cls = head(feats["cls"].reshape(b * n_crops, -1)).reshape(b, n_crops, -1)
        s_cf, t_cf = _crops_first(s_cls), _crops_first(cls_p)
        # DINOv2 pairing: global crop i against the teacher's other crop; locals against both.
        l_dino = sum(objectives.dino_loss(s_cf[i:i + 1], t_cf[n_crops - 1 - i:n_crops - i], o.student_temp)
                     for i in range(n_crops))
        n_terms = n_crops * (n_crops - 1)
        if "cls_local" in feats:
            n_local = feats["cls_local"].shape[1]
            s_loc = _crops_first(head(feats["cls_local"].reshape(b * n_local, -1)).reshape(b, n_local, -1))
            l_dino = l_dino + objectives.dino_loss(s_loc, t_cf, o.student_temp)
            n_terms += n_local * n_crops
        l_dino = l_dino / n_terms
        s_patch_logits = head(feats["patches"], valid)
        l_ibot = objectives.ibot_patch_loss_gathered(s_patch_logits, patch_p, weights, o.student_temp, n_crops * b)
        loss = o.dino_weight * l_dino + o.ibot_weight * l_ibot
        aux = {"l_dino": l_dino, "l_ibot": l_ibot}
        if with_koleo:
            aux["l_koleo"] = koleo(feats["cls"])
            loss = loss + o.koleo_weight * aux["l_koleo"]
        return loss, (aux, jax.lax.stop_gradient(s_cls))

    def ssl_loss(params, batch, targets, rng, n_masked):
        feats, rows = ssl_features(params, batch, rng, n_masked)
        loss, (aux, s_cls) = ssl_head_loss(params, feats, rows, targets)
        aux.update(ssl_diagnostics(_crops_first(s_cls), _crops_first(targets[0]), o.student_temp))
        return loss, aux

    def ssl_grads(params, teacher, batch, rng, temp, centers):
        """(L_ssl, aux), its gradient, the new centers and iBOT metrics (teacher entropy over the
        masked patches, kept masked patches): the whole batch at once, or k micro-batches
        against the whole batch's targets."""
        n_img = batch["ssl_global"].shape[0] * batch["ssl_global"].shape[1]
        m = o.center_momentum
        if k == 1:
            n_masked = max_masked_patches(config, n_img)
            tf = teacher_features(teacher, batch, n_masked)
            (cls_p, patch_p), (cls_logits, patch_logits) = ssl_targets(teacher, tf, centers, temp)
            (l, aux), g = jax.value_and_grad(ssl_loss, has_aux=True)(params, batch, (cls_p, patch_p), rng, n_masked)
            new_centers = (objectives.update_center(centers[0], cls_logits, m),
                           objectives.update_center(centers[1], patch_logits, m, valid=tf["valid"]))
            return (l, aux), g, new_centers, (_mean_entropy(patch_p), tf["valid"].sum())
        n_masked = max_masked_patches(config, n_img // k)  # per micro-batch
        batch = {key: batch[key] for key in ("ssl_global", "ssl_local", "ssl_masks") if key in batch}
        use_bn = config.model.head.use_bn
        # With centering, a micro-batch's targets need only the previous center: without the
        # head's BatchNorm the teacher runs inside the student's scan and the whole batch's
        # (masked patches, K) targets, the largest array of the step, are never held; the new
        # centers come from sums over micro-batches. Otherwise (Sinkhorn-Knopp's sums, BatchNorm
        # statistics) the teacher's head and targets run over the whole batch first.
        stream = o.centering == "centering" and not use_bn
        if not stream:
            tf = jax.tree.map(merge, stacked(lambda i, r: teacher_features(teacher, micro(batch, i), n_masked), rng))
            (cls_p, patch_p), (cls_logits, patch_logits) = ssl_targets(teacher, tf, centers, temp)
            new_centers = (objectives.update_center(centers[0], cls_logits, m),
                           objectives.update_center(centers[1], patch_logits, m, valid=tf["valid"]))
            ibot = (_mean_entropy(patch_p), tf["valid"].sum())
        aux, d_feats = {}, {}
        if use_bn:  # BatchNorm couples every row: the head and the losses over the cached trunk outputs
            feats, rows = jax.tree.map(merge, stacked(lambda i, r: ssl_features(params, micro(batch, i), r, n_masked), rng))
            (l, (aux, s_cls)), (g_head, d_feats) = jax.value_and_grad(ssl_head_loss, argnums=(0, 1), has_aux=True)(
                params, feats, rows, (cls_p, patch_p))
        elif o.koleo_weight:  # KoLeo's neighbours come from the whole batch: cached cls tokens
            cls = merge(stacked(lambda i, r: ssl_features(params, micro(batch, i), r, n_masked, local=False)[0]["cls"], rng))
            aux["l_koleo"], d_cls = jax.value_and_grad(koleo)(cls)
            d_feats = {"cls": o.koleo_weight * d_cls}

        def body(acc, x):
            """One micro-batch's trunk with the gradients of its outputs (and, without
            BatchNorm, its head and DINO / iBOT terms, a 1 / k share of the whole batch's means)."""
            i, r = x
            feats, pull, rows = jax.vjp(lambda p: ssl_features(p, micro(batch, i), r, n_masked), params, has_aux=True)
            d_given = micro(d_feats, i)
            if use_bn:
                return add(acc, pull(d_given)[0]), None
            sums = ()
            if stream:
                tf = teacher_features(teacher, micro(batch, i), n_masked)
                targets, (cls_logits, patch_logits) = ssl_targets(teacher, tf, centers, temp)
                valid = tf["valid"][:, None]
                sums = (cls_logits.sum(0), jnp.where(valid, patch_logits, 0.0).sum(0), tf["valid"].sum(),
                        _mean_entropy(targets[1]) * tf["valid"].sum())
            else:
                targets = micro((cls_p, patch_p), i)

            def share(p, f):
                loss, out = ssl_head_loss(p, f, rows, targets, with_koleo=False)
                return loss / k, out

            (l_i, out), (g_head, d) = jax.value_and_grad(share, argnums=(0, 1), has_aux=True)(params, feats)
            d = {key: v + d_given[key] if key in d_given else v for key, v in d.items()}
            return add(add(acc, g_head), pull(d)[0]), (l_i, out, targets[0], sums)

        g, per_micro = accumulate(body, jax.tree.map(jnp.zeros_like, params), rng)
        if use_bn:
            g = add(g, g_head)
        else:
            l_i, (parts, s_cls), cls_p_i, sums = per_micro
            l = l_i.sum() + (o.koleo_weight * aux["l_koleo"] if "l_koleo" in aux else 0.0)
            aux.update({key: v.mean() for key, v in parts.items()})  # means over equal micro-batches
            s_cls = merge(s_cls)
            if stream:
                cls_p = merge(cls_p_i)
                cls_sum, patch_sum, n_kept, entropy_sum = (x.sum(0) for x in sums)
                n_cls = cls_p.shape[0] * cls_p.shape[1]
                # One row holding the batch mean: update_center's EMA (and its no-masked-patch guard).
                new_centers = (objectives.update_center(centers[0], (cls_sum / n_cls)[None], m),
                               objectives.update_center(centers[1], (patch_sum / jnp.maximum(n_kept, 1))[None], m,
                                                        valid=(n_kept > 0)[None]))
                ibot = (entropy_sum / jnp.maximum(n_kept, 1), n_kept)
        aux.update(ssl_diagnostics(_crops_first(s_cls), _crops_first(cls_p), o.student_temp))
        return (l, aux), g, new_centers, ibot

    # ---- Reconstruction ----------------------------------------------------------------------
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
        return loss, (parts, (latents.mean(), latents.var()))

    def rec_grads(params, batch, rng, lpips_params):
        """(L_rec, aux), its gradient: a mean over images, so the mean of micro-batch means."""
        grad = jax.value_and_grad(rec_loss, has_aux=True)
        if k == 1:
            (l, (aux, _)), g = grad(params, batch, rng, lpips_params)
            return (l, aux), g

        def body(acc, x):
            (l, out), g = grad(params, micro({"rec_images": batch["rec_images"]}, x[0]), x[1], lpips_params)
            return add(acc, g), (l, out)

        g, (l, (parts, (mean, var))) = accumulate(body, jax.tree.map(jnp.zeros_like, params), rng)
        aux = {key: v.mean() for key, v in parts.items()}
        aux["latent_std"] = jnp.sqrt(var.mean() + mean.var())  # within + between micro-batches
        return (l.mean(), aux), jax.tree.map(lambda x: x / k, g)

    def step(state: TrainState, batch: dict, lpips_params=None):
        rng = jax.random.fold_in(state.rng, state.step)
        r_clip, r_ssl, r_rec = jax.random.split(rng, 3)
        params = state.params
        grads, metrics, total = [], {}, 0.0
        dino_center, ibot_center = state.dino_center, state.ibot_center
        if on["clip"]:
            (l, aux), g = clip_grads(params, batch, r_clip)
            grads.append(jax.tree.map(lambda x: o.l_clip * x, g))
            metrics.update(aux, l_clip=l, grad_norm_clip=optax.tree.norm(grads[-1]))
            total += o.l_clip * l
        if on["ssl"]:
            temp = teacher_temp(state.step)
            (l, aux), g, (dino_center, ibot_center), (ibot_entropy, n_kept) = ssl_grads(
                params, state.teacher_params, batch, r_ssl, temp, (state.dino_center, state.ibot_center))
            grads.append(jax.tree.map(lambda x: o.l_ssl * x, g))
            metrics.update(aux, l_ssl=l, grad_norm_ssl=optax.tree.norm(grads[-1]), teacher_temp=temp,
                           ibot_teacher_entropy=ibot_entropy,
                           ibot_masked=batch["ssl_masks"].sum(), ibot_dropped=batch["ssl_masks"].sum() - n_kept)
            total += o.l_ssl * l
        if on["rec"]:
            (l, aux), g = rec_grads(params, batch, r_rec, lpips_params)
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
def make_job(config: ml_collections.ConfigDict, mesh, workdir: str | None = None, abstract: bool = False) -> runner.Job:
    model_cfg = config_lib.model_config_for(config)
    model = VTP(model_cfg)
    abstract_params = param_shapes(model_cfg)  # traced once per model config in a process
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
                      step=make_train_step(config, model, tx), data=data, consts=load_lpips(config, mesh, abstract),
                      start=start, hooks=hooks, eval_target=model, export=export, model=model,
                      batch_spec=batch_spec(config), accum_choices=accum_choices(config, sharding.batch_size_of(mesh)))


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
