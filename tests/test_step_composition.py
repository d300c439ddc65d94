"""The pre-training step's composition against a NumPy re-derivation from the published formulas.

The model's outputs (student and teacher head logits, trunk cls tokens, CLIP embeddings,
reconstructions) come from separate `apply` calls; everything the step does with them (which crops
are paired, DINOv2's normalization by the number of terms, centering or Sinkhorn-Knopp, iBOT over
masked patches only, KoLeo, the OpenCLIP loss, L1 on [-1, 1] pixels, the lambda weights, the
center updates) is recomputed here in float64 and compared with what the step reports.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from vtp_jax import jobs, sharding
from vtp_jax.images import IMAGENET_MEAN, IMAGENET_STD
from vtp_jax.jobs import pretrain
from vtp_jax.models.vtp import VTP
from vtp_jax.train import runner


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def softmax(x):
    return np.exp(log_softmax(x))


def ce(t, s, student_temp):
    """-sum_k t log softmax(s / T) per row."""
    return -(t * log_softmax(s / student_temp)).sum(-1)


def sinkhorn(logits, temp, n_iter=3):
    """DINOv2's SinkhornKnopp.forward on (B, K) logits, as written there (exp domain)."""
    q = np.exp(logits / temp).T  # K x B
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(n_iter):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    q *= b
    return q.T


def koleo(x, eps=1e-8):
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    dots = x @ x.T
    np.fill_diagonal(dots, -1)
    nn_idx = dots.argmax(-1)
    dist = np.linalg.norm(x - x[nn_idx] + eps, axis=-1)
    return -np.log(dist + eps).mean()


def clip_np(img, txt, scale):
    logits = scale * img @ txt.T
    labels = np.arange(len(img))
    li = -log_softmax(logits)[labels, labels].mean()
    lt = -log_softmax(logits.T)[labels, labels].mean()
    return (li + lt) / 2


def to_px(x):
    return (x * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)) * 2 - 1


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_step_losses_match_numpy_rederivation(centering):
    c = tiny.get_config()
    c.objectives.centering = centering
    c.objectives.l_rec, c.objectives.l_ssl, c.objectives.l_clip = 0.7, 1.3, 0.9  # distinct lambdas
    c.objectives.dino_weight, c.objectives.ibot_weight, c.objectives.koleo_weight = 1.1, 0.8, 0.3
    c.objectives.center_momentum = 0.9  # DINOv2's (the demo uses 0): both terms of the EMA matter
    tr = jobs.build(c, sharding.make_mesh((1, 1, 1)))
    o, model = tr.config.objectives, tr.model
    batch = pretrain.synthetic_batch(tr.config, seed=3)
    with runner.scope(tr):
        state = tr.init(jax.random.key(0))
        rng = np.random.default_rng(0)
        # A teacher that differs from the student and non-zero centers: the test must see which is used.
        teacher = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                               jax.device_get(state.teacher_params))
        k = state.dino_center.shape[-1]
        centers = [0.1 * rng.standard_normal((1, k)).astype(np.float32) for _ in range(2)]
        state = state.replace(teacher_params=jax.device_put(teacher), dino_center=jnp.asarray(centers[0]),
                              ibot_center=jnp.asarray(centers[1]))
        student = jax.device_get(state.params)
        new_state, m = tr.step(state, sharding.global_batch(batch, tr.mesh), tr.consts)
        m = jax.device_get(m)
        new_state = jax.device_get(new_state)

    def apply(params, *args, method):
        return np.asarray(jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method))(params, *args),
                          np.float64)

    def feats(params, images, masks=None):
        f = jax.jit(lambda p, x, mk: model.apply({"params": p}, x, mk, method=VTP.encode_features))(params, images, masks)
        return {k: np.asarray(v, np.float64) for k, v in f.items() if k in ("cls", "patches")}

    g, loc, masks = batch["ssl_global"], batch["ssl_local"], batch["ssl_masks"]
    b, n_loc = g.shape[0], loc.shape[1]
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731  (image, crop) -> rows
    head = lambda p, x: apply(p, x.astype(np.float32), method=VTP.head)  # noqa: E731
    tf = feats(teacher, flat(g))
    sf = feats(student, flat(g), flat(masks))
    lf = feats(student, flat(loc))
    n_patch = tf["patches"].shape[1] * tf["patches"].shape[2]
    t_cls = head(teacher, tf["cls"]).reshape(b, 2, k)
    s_cls = head(student, sf["cls"]).reshape(b, 2, k)
    s_loc = head(student, lf["cls"]).reshape(b, n_loc, k)
    mk = masks.reshape(b, 2, n_patch)
    assert mk.any() and not mk.all() and m["ibot_dropped"] == 0
    # The head sees the masked patches only (its BatchNorm statistics are over those rows).
    t_pat, s_pat = np.zeros((b, 2, n_patch, k)), np.zeros((b, 2, n_patch, k))
    t_pat[mk] = head(teacher, tf["patches"].reshape(b, 2, n_patch, -1)[mk])
    s_pat[mk] = head(student, sf["patches"].reshape(b, 2, n_patch, -1)[mk])

    temp = o.warmup_teacher_temp  # step 0 of the teacher-temperature warm-up
    assert m["teacher_temp"] == pytest.approx(temp)
    if centering == "centering":
        t_p = softmax((t_cls - centers[0]) / temp)
        tp_p = np.where(mk[..., None], softmax((t_pat - centers[1]) / temp), 0.0)
    else:  # over all 2B global rows; iBOT over the masked patches of the whole batch only
        t_p = sinkhorn(t_cls.reshape(2 * b, k), temp).reshape(b, 2, k)
        tp_p = np.zeros_like(t_pat)
        tp_p[mk] = sinkhorn(t_pat[mk], temp)

    # DINO: global crop i against the teacher's crop 1 - i, every local crop against both, divided
    # by the number of (student, teacher) terms.
    st = o.student_temp
    terms = [ce(t_p[:, 1 - i], s_cls[:, i], st).mean() for i in range(2)]
    terms += [ce(t_p[:, i], s_loc[:, j], st).mean() for j in range(n_loc) for i in range(2)]
    l_dino = sum(terms) / len(terms)
    # iBOT: per crop image, the mean over its masked patches; summed, divided by all 2B crop images.
    per_patch = ce(tp_p, s_pat, st)
    per_image = np.where(mk, per_patch, 0).sum(-1) / np.maximum(mk.sum(-1), 1)
    l_ibot = per_image.sum() / (2 * b)
    l_koleo = sum(koleo(sf["cls"].reshape(b, 2, -1)[:, i]) for i in range(2))
    l_ssl = o.dino_weight * l_dino + o.ibot_weight * l_ibot + o.koleo_weight * l_koleo

    img_f = feats(student, batch["clip_images"])
    img = apply(student, {k: v.astype(np.float32) for k, v in img_f.items()}, method=VTP.clip_image)
    txt = apply(student, batch["tokens"], method=VTP.clip_text)
    scale = np.exp(min(float(student["text"]["logit_scale"]), np.log(100)))
    l_clip = clip_np(img, txt, scale)

    x = batch["rec_images"]
    recon = apply(student, apply(student, x, method=VTP.encode).astype(np.float32), method=VTP.decode)
    l_rec = o.l1_weight * np.abs(to_px(recon) - to_px(x.astype(np.float64))).mean()

    tol = dict(rel=2e-4, abs=1e-5)
    assert m["l_dino"] == pytest.approx(l_dino, **tol)
    assert m["l_ibot"] == pytest.approx(l_ibot, **tol)
    assert m["l_koleo"] == pytest.approx(l_koleo, **tol)
    assert m["l_ssl"] == pytest.approx(l_ssl, **tol)
    assert m["l_clip"] == pytest.approx(l_clip, **tol)
    assert m["l_rec"] == pytest.approx(l_rec, **tol)
    assert m["loss"] == pytest.approx(o.l_clip * l_clip + o.l_ssl * l_ssl + o.l_rec * l_rec, **tol)
    # Center updates: EMA (momentum 0.9) of the teacher's batch-mean cls logits / masked-patch logits.
    np.testing.assert_allclose(new_state.dino_center, 0.9 * centers[0] + 0.1 * t_cls.reshape(-1, k).mean(0),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new_state.ibot_center, 0.9 * centers[1] + 0.1 * t_pat[mk].mean(0),
                               rtol=1e-4, atol=1e-6)
