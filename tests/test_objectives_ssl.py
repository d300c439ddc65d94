"""CLIP, DINO, iBOT and KoLeo objectives against NumPy re-derivations of the OpenCLIP / DINOv2
formulas (float64), on one device and sharded over 8 CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from vtp_jax import objectives

RTOL = 1e-5
BATCH = ("data", "fsdp")


def unit_rows(rng, b, d):
    x = rng.standard_normal((b, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def mesh_of(shape, axis_type):
    devices = np.asarray(jax.devices()[: shape[0] * shape[1]]).reshape(shape)
    return Mesh(devices, BATCH, axis_types=(axis_type,) * 2)


def on_batch_shards(mesh, *xs):
    sharding = NamedSharding(mesh, P(BATCH))
    return [jax.device_put(x, sharding) for x in xs]


# ----------------------------------------------------------------------------- NumPy references

def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_clip(img, txt, scale):
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    labels = np.arange(len(img))
    per_image = scale * img @ txt.T
    per_text = scale * txt @ img.T
    ce_i = -np_log_softmax(per_image)[labels, labels].mean()
    ce_t = -np_log_softmax(per_text)[labels, labels].mean()
    return (ce_i + ce_t) / 2


def np_clip_grads(img, txt, scale):
    """Closed form: with G = img txt^T, P = softmax_rows(s G), Q = softmax_rows(s G^T)."""
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    b = len(img)
    g = img @ txt.T
    p, q, eye = np_softmax(scale * g), np_softmax(scale * g.T), np.eye(b)
    d_img = scale / (2 * b) * ((p - eye) @ txt + (q - eye).T @ txt)
    d_txt = scale / (2 * b) * ((p - eye).T @ img + (q - eye) @ img)
    d_scale = ((p * g).sum() + (q * g.T).sum() - 2 * np.trace(g)) / (2 * b)
    return d_img, d_txt, d_scale


def np_sinkhorn(logits, temp, n_iterations=3):
    """DINOv2's SinkhornKnoppTeacher, literally, in float64."""
    q = np.exp(logits.astype(np.float64) / temp).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def np_dino(student, teacher, temp):
    total = 0.0
    for s in student.astype(np.float64):
        lsm = np_log_softmax(s / temp)
        for t in teacher.astype(np.float64):
            total -= (t * lsm).sum(axis=-1).mean()
    return total


def np_ibot(student, teacher, masks, temp):
    total = 0.0
    for b in range(len(masks)):
        n_masked = max(masks[b].sum(), 1)
        for n in np.flatnonzero(masks[b]):
            lsm = np_log_softmax(student[b, n].astype(np.float64) / temp)
            total -= (teacher[b, n] * lsm).sum() / n_masked
    return total / len(masks)


def np_koleo(x, eps=1e-8):
    x = x.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
    dots = x @ x.T
    np.fill_diagonal(dots, -1.0)
    nn = dots.argmax(axis=1)
    distance = np.linalg.norm(x - x[nn] + eps, axis=1)  # torch PairwiseDistance(p=2, eps)
    return -np.log(distance + eps).mean()


# ----------------------------------------------------------------------------------------- CLIP

def test_clip_loss_matches_openclip_formula_and_gradients():
    rng = np.random.default_rng(0)
    img, txt = unit_rows(rng, 6, 5), unit_rows(rng, 6, 5)
    loss, grads = jax.value_and_grad(objectives.clip_loss, argnums=(0, 1, 2))(img, txt, 14.3)
    np.testing.assert_allclose(loss, np_clip(img, txt, 14.3), rtol=RTOL)
    for got, want in zip(grads, np_clip_grads(img, txt, 14.3)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_clip_loss_bfloat16_inputs_compute_in_float32():
    rng = np.random.default_rng(1)
    img, txt = jnp.asarray(unit_rows(rng, 5, 8), jnp.bfloat16), jnp.asarray(unit_rows(rng, 5, 8), jnp.bfloat16)
    loss = objectives.clip_loss(img, txt, 30.0)
    assert loss.dtype == jnp.float32
    want = np_clip(np.asarray(img, np.float64), np.asarray(txt, np.float64), 30.0)
    np.testing.assert_allclose(loss, want, rtol=RTOL)


def test_clip_loss_degenerate_inputs():
    rng = np.random.default_rng(2)
    one = unit_rows(rng, 1, 4)
    loss, grads = jax.value_and_grad(objectives.clip_loss, argnums=(0, 1))(one, unit_rows(rng, 1, 4), 50.0)
    assert float(loss) == 0.0  # one pair: the only candidate is the positive
    assert all(np.isfinite(g).all() for g in grads)
    same = np.repeat(one, 7, axis=0)  # identical rows: every logit ties, CE = log(B)
    np.testing.assert_allclose(objectives.clip_loss(same, same, 100.0), np.log(7), rtol=RTOL)
    img, txt = unit_rows(rng, 8, 4), unit_rows(rng, 8, 4)
    loss, grads = jax.value_and_grad(objectives.clip_loss, argnums=(0, 1))(img, txt, 1e4)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads)
    np.testing.assert_allclose(loss, np_clip(img, txt, 1e4), rtol=RTOL)


def test_clip_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="image_emb and text_emb"):
        objectives.clip_loss(jnp.zeros((4, 3)), jnp.zeros((4, 2)), 1.0)
    with pytest.raises(ValueError, match="scale must be a scalar"):
        objectives.clip_loss(jnp.zeros((4, 3)), jnp.zeros((4, 3)), jnp.ones(2))
    with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
        objectives.clip_loss(jnp.zeros((12, 3)), jnp.zeros((12, 3)), 1.0, mesh=mesh_of((2, 4), AxisType.Auto))


@pytest.mark.parametrize("shape,axis_type", [((2, 4), AxisType.Auto), ((8, 1), AxisType.Explicit)])
def test_clip_loss_sharded_equals_single_device(shape, axis_type):
    rng = np.random.default_rng(3)
    img, txt = unit_rows(rng, 16, 6), unit_rows(rng, 16, 6)
    f = jax.value_and_grad(objectives.clip_loss, argnums=(0, 1, 2))
    want_loss, want_grads = np_clip(img, txt, 20.0), np_clip_grads(img, txt, 20.0)
    mesh = mesh_of(shape, axis_type)
    with jax.set_mesh(mesh):
        loss, grads = jax.jit(f)(*on_batch_shards(mesh, img, txt), jnp.float32(20.0))
    assert grads[0].sharding.spec[0] == BATCH  # gradients land on the shard that owns each row
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_clip_loss_memory_per_device_shrinks_with_devices():
    b, e = 512, 16
    f = jax.jit(jax.value_and_grad(objectives.clip_loss, argnums=(0, 1)))
    single = jax.ShapeDtypeStruct((b, e), jnp.float32)
    temp_1 = f.lower(single, single, 1.0).compile().memory_analysis().temp_size_in_bytes
    mesh = mesh_of((8, 1), AxisType.Auto)
    with jax.set_mesh(mesh):
        sharded = jax.ShapeDtypeStruct((b, e), jnp.float32, sharding=NamedSharding(mesh, P(BATCH)))
        temp_8 = f.lower(sharded, sharded, 1.0).compile().memory_analysis().temp_size_in_bytes
    assert temp_1 >= 2 * b * b * 4  # the two full (B, B) float32 logit matrices
    assert temp_8 < temp_1 / 4, (temp_8, temp_1)


# ----------------------------------------------------------------------------- teacher targets

def test_softmax_center_teacher_and_update_center():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((2, 6, 5)).astype(np.float32)
    center = rng.standard_normal((1, 5)).astype(np.float32)
    probs = objectives.softmax_center_teacher(logits, center, 0.04)
    np.testing.assert_allclose(probs, np_softmax((logits - center) / 0.04), rtol=RTOL, atol=1e-7)
    want = center * 0.9 + logits.reshape(-1, 5).astype(np.float64).mean(0, keepdims=True) * 0.1
    got = objectives.update_center(center, logits, 0.9)
    assert got.shape == (1, 5)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    assert objectives.update_center(center[0], logits, 0.9).shape == (5,)
    valid = rng.random((2, 6)) < 0.5
    valid[0, 0] = True
    want = center * 0.9 + logits[valid].astype(np.float64).mean(0, keepdims=True) * 0.1
    np.testing.assert_allclose(objectives.update_center(center, logits, 0.9, valid=valid), want, rtol=RTOL)
    none = objectives.update_center(center, logits, 0.9, valid=np.zeros((2, 6), bool))
    np.testing.assert_array_equal(none, center)  # no row to average: the center is kept
    with pytest.raises(ValueError, match="prototypes"):
        objectives.softmax_center_teacher(logits, np.zeros((1, 4)), 0.04)


def test_sinkhorn_knopp_matches_dinov2():
    rng = np.random.default_rng(5)
    logits = rng.uniform(-1, 1, (12, 7)).astype(np.float32)  # cosine-like head outputs
    q = objectives.sinkhorn_knopp_teacher(logits, 0.07)
    np.testing.assert_allclose(q, np_sinkhorn(logits, 0.07), rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=RTOL)
    q5 = objectives.sinkhorn_knopp_teacher(logits, 0.05, n_iterations=5)
    np.testing.assert_allclose(q5, np_sinkhorn(logits, 0.05, 5), rtol=RTOL, atol=1e-7)
    valid = np.arange(12) % 3 != 0
    qv = objectives.sinkhorn_knopp_teacher(logits, 0.07, valid=valid)
    np.testing.assert_allclose(qv[valid], np_sinkhorn(logits[valid], 0.07), rtol=RTOL, atol=1e-7)
    assert not np.asarray(qv)[~valid].any()
    assert not np.asarray(objectives.sinkhorn_knopp_teacher(logits, 0.07, valid=np.zeros(12, bool))).any()
    with pytest.raises(ValueError, match="valid must be"):
        objectives.sinkhorn_knopp_teacher(logits, 0.07, valid=np.ones(3, bool))


def test_teacher_targets_sharded_equal_unsharded():
    rng = np.random.default_rng(6)
    logits = rng.uniform(-1, 1, (16, 5)).astype(np.float32)
    center = rng.standard_normal((1, 5)).astype(np.float32)
    valid = rng.random(16) < 0.6

    def targets(logits, valid):
        return (objectives.sinkhorn_knopp_teacher(logits, 0.07),
                objectives.sinkhorn_knopp_teacher(logits, 0.07, valid=valid),
                objectives.update_center(center, logits, 0.9),
                objectives.update_center(center, logits, 0.9, valid=valid))

    want = jax.jit(targets)(logits, valid)
    mesh = mesh_of((2, 4), AxisType.Auto)
    with jax.set_mesh(mesh):
        got = jax.jit(targets)(*on_batch_shards(mesh, logits, valid))
    assert got[0].sharding.spec[0] == BATCH
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=1e-7)


# -------------------------------------------------------------------------------- DINO, iBOT

def test_dino_loss_matches_dinov2_and_gradient():
    rng = np.random.default_rng(7)
    student = rng.standard_normal((3, 4, 6)).astype(np.float32)
    teacher = np_softmax(rng.standard_normal((2, 4, 6)) / 0.1).astype(np.float32)
    loss, grad = jax.value_and_grad(objectives.dino_loss)(student, teacher, 0.1)
    np.testing.assert_allclose(loss, np_dino(student, teacher, 0.1), rtol=RTOL)
    # d/ds of -mean_b sum_t sum_k t log_softmax(s / temp) = (T softmax(s / temp) - sum_t t) / (B temp)
    t_sum = teacher.astype(np.float64).sum(0)
    want = (len(teacher) * np_softmax(student / 0.1) - t_sum) / (4 * 0.1)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="dino_loss"):
        objectives.dino_loss(student, teacher[:, :3], 0.1)


def random_masks(rng, b, n):
    masks = rng.random((b, n)) < 0.4
    masks[0] = True  # an all-masked image
    masks[1] = False  # and an image without mask: both count in B
    return masks


def test_ibot_patch_loss_matches_dinov2_and_gradient():
    rng = np.random.default_rng(8)
    b, n, k = 5, 6, 4
    student = rng.standard_normal((b, n, k)).astype(np.float32)
    teacher = np_softmax(rng.standard_normal((b, n, k)) / 0.1).astype(np.float32)
    masks = random_masks(rng, b, n)
    loss, grad = jax.value_and_grad(objectives.ibot_patch_loss)(student, teacher, masks, 0.1)
    np.testing.assert_allclose(loss, np_ibot(student, teacher, masks, 0.1), rtol=RTOL)
    weight = masks / np.maximum(masks.sum(1, keepdims=True), 1) / b
    want = weight[..., None] * (np_softmax(student / 0.1) - teacher) / 0.1
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-7)
    assert float(objectives.ibot_patch_loss(student, teacher, np.zeros((b, n), bool), 0.1)) == 0.0


def test_gathered_ibot_equals_dense_on_one_and_eight_devices():
    rng = np.random.default_rng(9)
    b, n, k = 8, 6, 5
    student = rng.standard_normal((b, n, k)).astype(np.float32)
    teacher = np_softmax(rng.standard_normal((b, n, k)) / 0.1).astype(np.float32)
    masks = random_masks(rng, b, n)
    want = np_ibot(student, teacher, masks, 0.1)

    def gathered(student, teacher, masks, bound):
        s, valid, weights = objectives.gather_masked(student, masks, bound)
        t, valid_t, _ = objectives.gather_masked(teacher, masks, bound)
        return objectives.ibot_patch_loss_gathered(s, t, weights, 0.1, b), valid, valid_t

    def loss_and_validity(student):
        loss, valid, valid_t = gathered(student, teacher, masks, 40)
        return loss, (valid, valid_t)

    (loss, (valid, valid_t)), grad = jax.value_and_grad(loss_and_validity, has_aux=True)(student)
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    dense_grad = jax.grad(objectives.ibot_patch_loss)(student, teacher, masks, 0.1)
    np.testing.assert_allclose(grad, dense_grad, rtol=1e-6, atol=1e-9)
    assert valid.shape == (40,) and valid.sum() == masks.sum() and (valid == valid_t).all()
    rows, valid, weights = objectives.gather_masked(student, masks, 40)
    np.testing.assert_array_equal(rows[: masks.sum()], student[masks])  # (image, patch) order
    assert not np.asarray(rows)[~np.asarray(valid)].any() and not np.asarray(weights)[~np.asarray(valid)].any()
    short, valid, _ = gathered(student, teacher, masks, 3)  # bound exceeded: the rest is dropped
    assert valid.sum() == 3 and float(short) < float(loss)

    mesh = mesh_of((2, 4), AxisType.Explicit)
    with jax.set_mesh(mesh):
        s, t, m = on_batch_shards(mesh, student, teacher, masks)
        loss8, valid8, _ = jax.jit(gathered, static_argnums=3)(s, t, m, n * 8)
    assert valid8.shape == (n * 8,) and valid8.sharding.spec[0] == BATCH
    assert valid8.sum() == masks.sum()
    np.testing.assert_allclose(loss8, want, rtol=RTOL)
    with pytest.raises(ValueError, match="max_masked"):
        objectives.gather_masked(student, masks, 0)


def test_extreme_logits_stay_finite():
    rng = np.random.default_rng(10)
    big = 1e4 * rng.uniform(-1, 1, (2, 6, 5)).astype(np.float32)
    center = np.zeros((1, 5), np.float32)
    probs = objectives.softmax_center_teacher(big[0], center, 0.04)
    sk = objectives.sinkhorn_knopp_teacher(big[0], 0.04)
    assert np.isfinite(probs).all() and np.isfinite(sk).all()
    np.testing.assert_allclose(sk.sum(axis=1), 1.0, rtol=RTOL)
    dino, g_dino = jax.value_and_grad(objectives.dino_loss)(big, probs[None], 0.1)
    ibot, g_ibot = jax.value_and_grad(objectives.ibot_patch_loss)(big, np.full_like(big, 0.2),
                                                                  np.ones((2, 6), bool), 0.1)
    for x in (dino, g_dino, ibot, g_ibot, objectives.update_center(center, big, 0.9)):
        assert np.isfinite(x).all()
    np.testing.assert_allclose(dino, np_dino(big, np.asarray(probs, np.float64)[None], 0.1), rtol=RTOL)


def test_bfloat16_logits_are_scored_in_float32():
    rng = np.random.default_rng(11)
    student = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.bfloat16)
    teacher = jnp.asarray(np_softmax(rng.standard_normal((1, 3, 8))), jnp.bfloat16)
    loss = objectives.dino_loss(student, teacher, 0.1)
    assert loss.dtype == jnp.float32
    want = np_dino(np.asarray(student, np.float64), np.asarray(teacher, np.float64), 0.1)
    np.testing.assert_allclose(loss, want, rtol=RTOL)


# ------------------------------------------------------------------------------------- KoLeo

def test_koleo_matches_dinov2_and_finite_differences():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((8, 5)).astype(np.float32)
    loss, grad = jax.value_and_grad(objectives.koleo_loss)(x)
    np.testing.assert_allclose(loss, np_koleo(x), rtol=RTOL)
    h, x64, numeric = 1e-6, x.astype(np.float64), np.zeros(x.shape)
    for i in np.ndindex(x.shape):
        step = np.zeros(x.shape)
        step[i] = h
        numeric[i] = (np_koleo(x64 + step) - np_koleo(x64 - step)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)


def test_koleo_degenerate_inputs():
    rng = np.random.default_rng(13)
    one = rng.standard_normal((1, 16)).astype(np.float32)
    loss, grad = jax.value_and_grad(objectives.koleo_loss)(one)
    np.testing.assert_allclose(loss, -np.log(1e-8 * np.sqrt(16) + 1e-8), rtol=RTOL)  # its own neighbour
    assert not np.asarray(grad).any()
    same = np.repeat(one, 4, axis=0)
    loss, grad = jax.value_and_grad(objectives.koleo_loss)(same)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    np.testing.assert_allclose(loss, np_koleo(same), rtol=RTOL)
    zeros = np.zeros((3, 4), np.float32)  # normalize's eps keeps zero rows at zero
    assert np.isfinite(objectives.koleo_loss(zeros))
    with pytest.raises(ValueError, match="koleo_loss"):
        objectives.koleo_loss(np.zeros((2, 3, 4)))


def test_koleo_sharded_equals_single_device():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((16, 6)).astype(np.float32)
    want, want_grad = jax.value_and_grad(objectives.koleo_loss)(x)
    mesh = mesh_of((2, 4), AxisType.Auto)
    with jax.set_mesh(mesh):
        loss, grad = jax.jit(jax.value_and_grad(objectives.koleo_loss))(*on_batch_shards(mesh, x))
    np.testing.assert_allclose(loss, np_koleo(x), rtol=RTOL)
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
