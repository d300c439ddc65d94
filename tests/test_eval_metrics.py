"""Evaluation metrics (PSNR, SSIM, zero-shot, linear probe, kNN) against closed forms and NumPy
re-derivations of the published protocols (torchmetrics SSIM, OpenCLIP prompt ensembling, DINO's
weighted kNN), on one device and with the train rows sharded over 8 CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from numpy.lib.stride_tricks import sliding_window_view

from vtp_jax.data import procedural
from vtp_jax.evals import probes, reconstruction, zero_shot
from vtp_jax.sharding import make_mesh


def on_batch_shards(mesh, *xs):
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    return [jax.device_put(x, sharding) for x in xs]


# ----------------------------------------------------------------------------- reconstruction

def test_psnr_closed_form_and_identical_images():
    rng = np.random.default_rng(0)
    x = rng.uniform(20, 200, (4, 8, 6, 3)).astype(np.float32)
    offsets = np.array([1.0, 0.5, -7.25, 0.0], np.float32)  # a constant offset d: MSE = d^2
    got = np.asarray(reconstruction.psnr(x, x + offsets[:, None, None, None]))
    np.testing.assert_allclose(got[:3], 20 * np.log10(255 / np.abs(offsets[:3])), rtol=1e-5)
    assert got[3] == np.inf


def np_ssim(x, y, data_range=1.0):
    """torchmetrics' SSIM per image (float64): 2-D gaussian kernel (outer product of the normalized
    11-tap sigma-1.5 window), reflect padding by 5, per-channel 'valid' correlation, the map
    averaged over all pixels and channels."""
    d = np.arange(11) - 5.0
    g = np.exp(-(d / 1.5) ** 2 / 2)
    g /= g.sum()
    kernel = np.outer(g, g)
    x, y = x.astype(np.float64), y.astype(np.float64)

    def blur(v):  # (B, H, W, C) -> same size after reflect padding
        v = np.pad(v, ((0, 0), (5, 5), (5, 5), (0, 0)), mode="reflect")
        windows = sliding_window_view(v, (11, 11), axis=(1, 2))  # (B, H, W, C, 11, 11)
        return np.einsum("bhwcij,ij->bhwc", windows, kernel)

    mx, my = blur(x), blur(y)
    vx = np.maximum(blur(x * x) - mx ** 2, 0)
    vy = np.maximum(blur(y * y) - my ** 2, 0)
    cxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(axis=(1, 2, 3))


@pytest.mark.parametrize("shape", [(2, 16, 16, 3), (1, 23, 37, 3), (2, 6, 11, 3)])
def test_ssim_matches_numpy_reference(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.uniform(0, 1, shape).astype(np.float32)
    # From heavy noise to a mild change, so the SSIMs span a wide range.
    y = np.clip(x + rng.normal(0, 1, shape[:1] + (1, 1, 1)) * rng.normal(0, 0.3, shape), 0, 1).astype(np.float32)
    ssim = jax.jit(reconstruction.ssim)
    np.testing.assert_allclose(np.asarray(ssim(x, y)), np_ssim(x, y), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ssim(x, x)), 1.0, atol=1e-6)


def test_ssim_rejects_bad_shapes():
    with pytest.raises(ValueError, match="equal shape"):
        reconstruction.ssim(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 9, 3)))
    with pytest.raises(ValueError, match="at least 6 x 6"):
        reconstruction.ssim(np.zeros((1, 5, 8, 3)), np.zeros((1, 5, 8, 3)))


# ----------------------------------------------------------------------------- zero-shot

def test_prompt_files():
    names, templates = zero_shot.imagenet_classnames(), zero_shot.openai_templates()
    assert len(names) == 1000 and len(templates) == 80
    assert names[:3] == ("tench", "goldfish", "great white shark") and names[-1] == "toilet paper"
    assert names[207] == "Golden Retriever" and names[281] == "tabby cat"
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
    assert "a photo of a {}." in templates and all(t.count("{}") == 1 for t in templates)


def test_procedural_prompts_name_every_one_object_caption():
    names, templates = zero_shot.procedural_prompts()
    assert names == procedural.CLASS_NAMES and len(names) == 64 and len(templates) == 24
    for shape in procedural.SHAPES:
        for color in procedural.COLOR_NAMES:
            assert names[procedural.label_of(shape, color)] == f"{color} {shape}"
    seen = 0
    for i in range(40):
        ex = procedural.render_example(3, i, size=8)
        if not any(f" {r} " in ex["caption"] for r in procedural.RELATIONS):
            seen += 1
            assert ex["caption"] in {t.format(names[ex["label"]]) for t in templates}, ex["caption"]
    assert seen >= 10


def test_classifier_weights_normalize_average_renormalize():
    classnames, templates = ["cat", "dog", "tiny red car"], ["a photo of a {}.", "{}", "art of the {}!",
                                                             "a {} again", "my {}"]
    prompts = [t.format(c) for c in classnames for t in templates]
    rng = np.random.default_rng(0)
    # Embeddings of very different norms, so that averaging before normalizing would differ.
    table = rng.normal(size=(len(prompts), 6)) * rng.uniform(0.1, 20, (len(prompts), 1))
    calls = []

    def tokenize(texts):
        return np.array([[prompts.index(t), 7] for t in texts], np.int32)

    def encode_text(ids):
        calls.append(ids.shape)
        return jnp.asarray(table[ids[:, 0]], jnp.float32)

    got = np.asarray(zero_shot.classifier_weights(encode_text, tokenize, classnames, templates, batch_size=4))
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    mean = unit.reshape(3, 5, 6).mean(axis=1)
    want = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-6)
    naive = table.reshape(3, 5, 6).mean(axis=1)
    assert np.abs(naive / np.linalg.norm(naive, axis=1, keepdims=True) - want).max() > 1e-2
    assert calls == [(4, 2)] * 4  # 15 prompts in fixed-size batches, the last one padded


def test_zero_shot_logits_and_topk_counts():
    rng = np.random.default_rng(1)
    img, w = rng.normal(size=(5, 8)) * 3, rng.normal(size=(7, 8))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    got = np.asarray(zero_shot.zero_shot_logits(img.astype(np.float32), w.astype(np.float32)))
    np.testing.assert_allclose(got, 100 * (img / np.linalg.norm(img, axis=1, keepdims=True)) @ w.T, atol=1e-4)

    logits = np.array([[0, 5, 1, 2, 3, 4, -1],   # label 1: top-1
                       [0, 5, 1, 2, 3, 4, -1],   # label 3: 4th -> top-5 only
                       [0, 5, 1, 2, 3, 4, -1],   # label 6: 7th -> neither
                       [0, 5, 1, 2, 3, 4, -1],   # padding row with a top-1 label: never counts
                       [0, 5, 1, 2, 3, 4, -1],   # padding row labelled -1
                       [2, 2, 2, 2, 2, 2, 2],    # all tied: label 5 sits 6th -> neither
                       [2, 2, 2, 2, 2, 2, 2],    # all tied: label 0 sits 1st
                       [np.nan] * 7], np.float32)  # NaN logits never count
    labels = np.array([1, 3, 6, 1, -1, 5, 0, 2])
    valid = np.array([1, 1, 1, 0, 0, 1, 1, 1], bool)
    topk_correct = jax.jit(zero_shot.topk_correct, static_argnames="ks")
    np.testing.assert_array_equal(topk_correct(logits, labels, valid), [2, 3])

    # Random logits against a stable argsort (NumPy's ranking), with padding rows.
    logits = rng.normal(size=(64, 10)).astype(np.float32)
    labels, valid = rng.integers(0, 10, 64), rng.random(64) < 0.8
    rank = np.argmax(np.argsort(-logits, axis=1, kind="stable") == labels[:, None], axis=1)
    want = [np.sum((rank < k) & valid) for k in (1, 3, 5)]
    np.testing.assert_array_equal(topk_correct(logits, labels, valid, ks=(1, 3, 5)), want)


# ----------------------------------------------------------------------------- probes

def clusters(rng, n, centers, pad=0):
    """Gaussian clusters around `centers`, then `pad` padding rows (label -1)."""
    y = rng.integers(0, len(centers), n)
    x = centers[y] + rng.normal(size=(n, centers.shape[1]))
    x = np.concatenate([x, rng.normal(size=(pad, centers.shape[1]))]).astype(np.float32)
    return x, np.concatenate([y, -np.ones(pad, int)]).astype(np.int32)


def test_linear_probe_separable_clusters_and_mesh_equality():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 16)) * 1.5
    train_x, train_y = clusters(rng, 500, centers, pad=12)
    val_x, val_y = clusters(rng, 150, centers, pad=10)
    kw = dict(num_classes=8, epochs=4, batch_size=64, seed=3)
    res = probes.linear_probe(train_x, train_y, val_x, val_y, **kw)
    per_lr = res["top1_per_lr"]
    assert list(per_lr) == list(probes.DINOV2_LRS)
    assert res["top1"] >= 0.99 and res["top5"] == 1.0
    assert res["lr"] > probes.DINOV2_LRS[0] and per_lr[probes.DINOV2_LRS[0]] < res["top1"]
    assert res["top1"] == max(per_lr.values()) == per_lr[res["lr"]]

    mesh = make_mesh((8, 1, 1))
    sharded = probes.linear_probe(*on_batch_shards(mesh, train_x, train_y, val_x, val_y), mesh=mesh, **kw)
    np.testing.assert_allclose(list(sharded["top1_per_lr"].values()), list(per_lr.values()), atol=1e-12)
    assert sharded["lr"] == res["lr"] and sharded["top5"] == res["top5"]

    with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
        probes.linear_probe(train_x[:-1], train_y[:-1], val_x, val_y, mesh=mesh, **kw)


def np_sgd_heads(x, y, lrs, steps, momentum, weight_decay, batch_size):
    """Full-batch torch SGD (momentum, weight decay added to the gradient) on a zero-initialised
    softmax regression per lr, DINOv2's lr x batch / 256 and CosineAnnealingLR (float64)."""
    real = y >= 0
    x, onehot = x[real].astype(np.float64), np.eye(y.max() + 1)[y[real]]
    heads = []
    for lr in lrs:
        w, b = np.zeros((x.shape[1], onehot.shape[1])), np.zeros(onehot.shape[1])
        buf_w, buf_b = np.zeros_like(w), np.zeros_like(b)
        for t in range(steps):
            z = x @ w + b
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            g_w = x.T @ (p - onehot) / len(x) + weight_decay * w
            g_b = (p - onehot).mean(axis=0) + weight_decay * b
            buf_w, buf_b = momentum * buf_w + g_w, momentum * buf_b + g_b
            step_lr = lr * batch_size / 256 * 0.5 * (1 + np.cos(np.pi * t / steps))
            w, b = w - step_lr * buf_w, b - step_lr * buf_b
        heads.append((w, b))
    return heads


def test_linear_probe_matches_numpy_sgd():
    """Val rows labelled with NumPy's predictions of head j must be 100% right for head j and not
    for the other: hundreds of random val rows near the decision boundaries make this sensitive
    to the lr scaling, momentum, weight decay, schedule and padding mask."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(32, 5)).astype(np.float32)
    y = rng.integers(0, 3, 32).astype(np.int32)
    y[-4:] = -1  # padding rows: out of the mean
    val_x = rng.normal(size=(400, 5)).astype(np.float32)
    lrs, epochs = (0.3, 3.0), 10
    heads = np_sgd_heads(x, y, lrs, epochs, momentum=0.9, weight_decay=0.5, batch_size=32)
    for j, (w, b) in enumerate(heads):
        val_y = np.argmax(val_x @ w + b, axis=1).astype(np.int32)
        res = probes.linear_probe(x, y, val_x, val_y, 3, lrs=lrs, epochs=epochs, batch_size=32,
                                  weight_decay=0.5)
        assert res["top1_per_lr"][lrs[j]] == 1.0 and res["top1_per_lr"][lrs[1 - j]] < 0.99, res


def test_knn_separable_clusters():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(6, 12)) * 4
    train_x, train_y = clusters(rng, 240, centers, pad=8)
    val_x, val_y = clusters(rng, 70, centers, pad=2)
    assert probes.knn(train_x, train_y, val_x, val_y, 6, k=10, batch_size=32) == {"top1": 1.0, "top5": 1.0}


def np_knn_ranking(train_x, train_y, val_x, num_classes, k, temperature):
    """DINO's vote (float64): cosine top-k over real train rows, class scores = sum of
    exp(sim / T) of the neighbours of each class; classes in descending order (stable)."""
    t = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    v = val_x / np.linalg.norm(val_x, axis=1, keepdims=True)
    real = train_y >= 0
    sim = (v @ t[real].T).astype(np.float64)
    neighbours = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(v), num_classes))
    for row, idx in enumerate(neighbours):
        np.add.at(votes[row], train_y[real][idx], np.exp(sim[row, idx] / temperature))
    return np.argsort(-votes, axis=1, kind="stable")


def test_knn_matches_numpy_vote_and_mesh():
    """Each class rank r is checked exactly: with every val row labelled by NumPy's r-th class,
    top-1 must be 100% for r = 0 and 0% after, top-5 100% for r < 5 and 0% after."""
    rng = np.random.default_rng(2)
    num_classes, k, temperature = 7, 9, 0.1
    train_x = rng.normal(size=(56, 8)).astype(np.float32)
    train_y = rng.integers(0, num_classes, 56).astype(np.int32)
    val_x = rng.normal(size=(19, 8)).astype(np.float32)
    train_x[-4:] = val_x[:4]  # the nearest possible neighbours, but padding: they must not vote
    train_y[-4:] = -1
    order = np_knn_ranking(train_x, train_y, val_x, num_classes, k, temperature)
    assert len(np.unique(order[:, 0])) > 2  # a non-trivial case

    mesh = make_mesh((8, 1, 1))
    sharded_train = on_batch_shards(mesh, train_x, train_y)
    for r in range(num_classes):
        val_y = order[:, r].astype(np.int32)
        want = {"top1": float(r == 0), "top5": float(r < 5)}
        assert probes.knn(train_x, train_y, val_x, val_y, num_classes, k, temperature, batch_size=8) == want, r
        assert probes.knn(*sharded_train, val_x, val_y, num_classes, k, temperature, batch_size=8,
                          mesh=mesh) == want, r
