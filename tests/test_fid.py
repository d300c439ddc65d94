"""FID: pytorch-fid's Inception-v3 in Flax, its converter, the resize, streamed statistics, the distance.

The references are written here from the published definitions: torchvision's BasicConv2d and
Inception blocks with pytorch-fid's FID patches as NumPy float64 code over a random state dict in
pytorch-fid's key layout (OIHW convs, BatchNorm vectors), so the Flax network and the converter's
key / layout map are checked together against something independent; torch's bilinear
interpolation re-derived from its index formulas; Gaussian closed forms for the distance; np.cov
for the statistics.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from numpy.lib.stride_tricks import sliding_window_view

from vtp_jax import sharding
from vtp_jax.checkpoints import torch_convert
from vtp_jax.evals import fid
from vtp_jax.models import inception

BN_KEYS = ("weight", "bias", "running_mean", "running_var")


# ----------------------------------------------------------------------------------------------
# pytorch-fid's state-dict layout (printed from its FID Inception-v3 built with aux_logits=False).
# ----------------------------------------------------------------------------------------------
def _basic_convs():
    """(name, out, in, kh, kw) of every BasicConv2d, in state-dict order."""
    convs = [("Conv2d_1a_3x3", 32, 3, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 64, 32, 3, 3),
             ("Conv2d_3b_1x1", 80, 64, 1, 1), ("Conv2d_4a_3x3", 192, 80, 3, 3)]
    for m, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs += [(f"{m}.branch1x1", 64, cin, 1, 1), (f"{m}.branch5x5_1", 48, cin, 1, 1),
                  (f"{m}.branch5x5_2", 64, 48, 5, 5), (f"{m}.branch3x3dbl_1", 64, cin, 1, 1),
                  (f"{m}.branch3x3dbl_2", 96, 64, 3, 3), (f"{m}.branch3x3dbl_3", 96, 96, 3, 3),
                  (f"{m}.branch_pool", pool, cin, 1, 1)]
    convs += [("Mixed_6a.branch3x3", 384, 288, 3, 3), ("Mixed_6a.branch3x3dbl_1", 64, 288, 1, 1),
              ("Mixed_6a.branch3x3dbl_2", 96, 64, 3, 3), ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3)]
    for m, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs += [(f"{m}.branch1x1", 192, 768, 1, 1), (f"{m}.branch7x7_1", c, 768, 1, 1),
                  (f"{m}.branch7x7_2", c, c, 1, 7), (f"{m}.branch7x7_3", 192, c, 7, 1),
                  (f"{m}.branch7x7dbl_1", c, 768, 1, 1), (f"{m}.branch7x7dbl_2", c, c, 7, 1),
                  (f"{m}.branch7x7dbl_3", c, c, 1, 7), (f"{m}.branch7x7dbl_4", c, c, 7, 1),
                  (f"{m}.branch7x7dbl_5", 192, c, 1, 7), (f"{m}.branch_pool", 192, 768, 1, 1)]
    convs += [("Mixed_7a.branch3x3_1", 192, 768, 1, 1), ("Mixed_7a.branch3x3_2", 320, 192, 3, 3),
              ("Mixed_7a.branch7x7x3_1", 192, 768, 1, 1), ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
              ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1), ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3)]
    for m, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs += [(f"{m}.branch1x1", 320, cin, 1, 1), (f"{m}.branch3x3_1", 384, cin, 1, 1),
                  (f"{m}.branch3x3_2a", 384, 384, 1, 3), (f"{m}.branch3x3_2b", 384, 384, 3, 1),
                  (f"{m}.branch3x3dbl_1", 448, cin, 1, 1), (f"{m}.branch3x3dbl_2", 384, 448, 3, 3),
                  (f"{m}.branch3x3dbl_3a", 384, 384, 1, 3), (f"{m}.branch3x3dbl_3b", 384, 384, 3, 1),
                  (f"{m}.branch_pool", 192, cin, 1, 1)]
    return convs


def _random_state_dict(seed=0):
    """Random weights in pytorch-fid's layout that keep activations O(1) through 94 convs."""
    rng = np.random.default_rng(seed)
    sd = {}
    for name, cout, cin, kh, kw in _basic_convs():
        std = np.sqrt(2.0 / (cin * kh * kw))
        sd[f"{name}.conv.weight"] = (std * rng.standard_normal((cout, cin, kh, kw), np.float32)).astype(np.float32)
        sd[f"{name}.bn.weight"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        sd[f"{name}.bn.bias"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        sd[f"{name}.bn.running_mean"] = (0.2 * rng.standard_normal(cout)).astype(np.float32)
        sd[f"{name}.bn.running_var"] = rng.uniform(0.5, 2.0, cout).astype(np.float32)
        sd[f"{name}.bn.num_batches_tracked"] = np.array(0, np.int64)
    sd["fc.weight"] = (rng.standard_normal((1008, 2048), np.float32) / np.sqrt(2048)).astype(np.float32)
    sd["fc.bias"] = (0.1 * rng.standard_normal(1008)).astype(np.float32)
    return sd


# ----------------------------------------------------------------------------------------------
# NumPy float64 reference: torchvision's Inception3 pieces with pytorch-fid's FID patches.
# ----------------------------------------------------------------------------------------------
def _conv(x, sd, name, stride=1, padding=(0, 0)):
    """BasicConv2d: conv (OIHW weight, no bias) -> BatchNorm(eps=0.001, running stats) -> ReLU."""
    w = sd[f"{name}.conv.weight"].astype(np.float64)
    x = np.pad(x, ((0, 0), (padding[0],) * 2, (padding[1],) * 2, (0, 0)))
    win = sliding_window_view(x, w.shape[2:], axis=(1, 2))[:, ::stride, ::stride]
    y = np.tensordot(win, w, axes=([3, 4, 5], [1, 2, 3]))
    g, b, m, v = (sd[f"{name}.bn.{k}"].astype(np.float64) for k in BN_KEYS)
    return np.maximum((y - m) / np.sqrt(v + 0.001) * g + b, 0.0)


def _max_pool(x, stride, pad):
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
    return sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::stride, ::stride].max(axis=(-2, -1))


def _avg_pool_exclude_pad(x):
    """F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)."""
    total = sliding_window_view(np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), axis=(1, 2)).sum(axis=(-2, -1))
    count = sliding_window_view(np.pad(np.ones(x.shape[1:3]), 1), (3, 3)).sum(axis=(-2, -1))
    return total / count[None, :, :, None]


def _np_stem(x, sd):
    x = _conv(x, sd, "Conv2d_1a_3x3", stride=2)
    x = _conv(x, sd, "Conv2d_2a_3x3")
    x = _max_pool(_conv(x, sd, "Conv2d_2b_3x3", padding=(1, 1)), 2, 0)
    x = _conv(_conv(x, sd, "Conv2d_3b_1x1"), sd, "Conv2d_4a_3x3")
    return _max_pool(x, 2, 0)


def _np_a(x, sd, m):
    c = functools.partial(_conv, sd=sd)
    b5 = c(c(x, name=f"{m}.branch5x5_1"), name=f"{m}.branch5x5_2", padding=(2, 2))
    bd = c(x, name=f"{m}.branch3x3dbl_1")
    bd = c(c(bd, name=f"{m}.branch3x3dbl_2", padding=(1, 1)), name=f"{m}.branch3x3dbl_3", padding=(1, 1))
    bp = c(_avg_pool_exclude_pad(x), name=f"{m}.branch_pool")
    return np.concatenate([c(x, name=f"{m}.branch1x1"), b5, bd, bp], axis=-1)


def _np_b(x, sd, m):
    c = functools.partial(_conv, sd=sd)
    bd = c(c(x, name=f"{m}.branch3x3dbl_1"), name=f"{m}.branch3x3dbl_2", padding=(1, 1))
    bd = c(bd, name=f"{m}.branch3x3dbl_3", stride=2)
    return np.concatenate([c(x, name=f"{m}.branch3x3", stride=2), bd, _max_pool(x, 2, 0)], axis=-1)


def _np_c(x, sd, m):
    c = functools.partial(_conv, sd=sd)
    row, col = (0, 3), (3, 0)  # padding of the 1x7 and 7x1 convs
    b7 = c(c(x, name=f"{m}.branch7x7_1"), name=f"{m}.branch7x7_2", padding=row)
    b7 = c(b7, name=f"{m}.branch7x7_3", padding=col)
    bd = c(x, name=f"{m}.branch7x7dbl_1")
    for i, pad in zip((2, 3, 4, 5), (col, row, col, row)):
        bd = c(bd, name=f"{m}.branch7x7dbl_{i}", padding=pad)
    bp = c(_avg_pool_exclude_pad(x), name=f"{m}.branch_pool")
    return np.concatenate([c(x, name=f"{m}.branch1x1"), b7, bd, bp], axis=-1)


def _np_d(x, sd, m):
    c = functools.partial(_conv, sd=sd)
    b3 = c(c(x, name=f"{m}.branch3x3_1"), name=f"{m}.branch3x3_2", stride=2)
    b7 = c(c(x, name=f"{m}.branch7x7x3_1"), name=f"{m}.branch7x7x3_2", padding=(0, 3))
    b7 = c(c(b7, name=f"{m}.branch7x7x3_3", padding=(3, 0)), name=f"{m}.branch7x7x3_4", stride=2)
    return np.concatenate([b3, b7, _max_pool(x, 2, 0)], axis=-1)


def _np_e(x, sd, m, max_pool):
    c = functools.partial(_conv, sd=sd)
    b3 = c(x, name=f"{m}.branch3x3_1")
    b3 = np.concatenate([c(b3, name=f"{m}.branch3x3_2a", padding=(0, 1)),
                         c(b3, name=f"{m}.branch3x3_2b", padding=(1, 0))], axis=-1)
    bd = c(c(x, name=f"{m}.branch3x3dbl_1"), name=f"{m}.branch3x3dbl_2", padding=(1, 1))
    bd = np.concatenate([c(bd, name=f"{m}.branch3x3dbl_3a", padding=(0, 1)),
                         c(bd, name=f"{m}.branch3x3dbl_3b", padding=(1, 0))], axis=-1)
    pooled = _max_pool(x, 1, 1) if max_pool else _avg_pool_exclude_pad(x)
    return np.concatenate([c(x, name=f"{m}.branch1x1"), b3, bd, c(pooled, name=f"{m}.branch_pool")], axis=-1)


def _np_logits_and_features(x, sd):
    x = _np_stem(x, sd)
    for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = _np_a(x, sd, m)
    x = _np_b(x, sd, "Mixed_6a")
    for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = _np_c(x, sd, m)
    x = _np_e(_np_e(_np_d(x, sd, "Mixed_7a"), sd, "Mixed_7b", False), sd, "Mixed_7c", True)
    features = x.mean(axis=(1, 2))
    return features @ sd["fc.weight"].astype(np.float64).T + sd["fc.bias"], features


def _np_torch_bilinear(x, out_h, out_w):
    """F.interpolate(mode='bilinear', align_corners=False, antialias=False) from torch's CPU index
    math: scale = in / out as a float32; src = (dst + 0.5) * scale - 0.5, rounded once to float32
    (the kernel fuses the multiply-add) and clamped at 0; float32 weights 1 - l and l on floor(src)
    and min(floor(src) + 1, in - 1). This reproduces torch's weights bit for bit."""
    def matrix(n_in, n_out):
        scale = np.float64(np.float32(n_in) / np.float32(n_out))
        src = np.maximum(((np.arange(n_out) + 0.5) * scale - 0.5).astype(np.float32), np.float32(0))
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = src - i0.astype(np.float32)
        m = np.zeros((n_out, n_in))
        np.add.at(m, (np.arange(n_out), i0), (np.float32(1) - lam).astype(np.float64))
        np.add.at(m, (np.arange(n_out), i1), lam.astype(np.float64))
        return m
    rows = np.einsum("oh,bhwc->bowc", matrix(x.shape[1], out_h), x.astype(np.float64), optimize=True)
    return np.einsum("bowc,pw->bopc", rows, matrix(x.shape[2], out_w), optimize=True)


def _assert_close(got, want, rel=1e-4):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= rel, f"max |got - want| / max |want| = {err:.3g} > {rel}"


def _images(rng, b, h, w):
    """Half noise, half smooth colour waves: images whose features really differ."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    smooth = []
    for _ in range(b - b // 2):
        phase = 2 * np.pi * rng.uniform(0.5, 4) * (xx + rng.uniform(-1, 1) * yy)
        smooth.append(np.clip(0.5 + rng.uniform(0.1, 0.5) * np.sin(phase[..., None] + rng.uniform(0, 6, 3)), 0, 1))
    return np.concatenate([rng.uniform(0, 1, (b // 2, h, w, 3)), np.stack(smooth)]).astype(np.float32)


@pytest.fixture(scope="module")
def weights():
    sd = _random_state_dict()
    return sd, torch_convert.inception_params_from_state_dict(sd)


@pytest.fixture(scope="module")
def outputs8(weights):
    """Eight images of an odd size and their features and logits on one device, computed once."""
    _, params = weights
    x = _images(np.random.default_rng(7), 8, 37, 50)
    both = jax.jit(lambda p, x: (fid.inception_features(p, x), fid.inception_logits(p, x)))
    return x, *(np.asarray(a) for a in both(params, x))


# ----------------------------------------------------------------------------------------------
# Network and converter.
# ----------------------------------------------------------------------------------------------
def test_state_dict_layout_is_pytorch_fids(weights):
    sd, _ = weights
    # 94 BasicConv2d (conv weight + 5 BatchNorm entries each) and fc: pytorch-fid's 566 keys.
    assert len(sd) == 566
    assert sd["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert not any(k.startswith("AuxLogits") for k in sd)


_BLOCKS = {  # name -> (Flax module, NumPy reference, input (H, W, C)); non-square catches H/W swaps.
    "stem": (None, _np_stem, (45, 38, 3)),
    "Mixed_5b": (inception.InceptionA(32), functools.partial(_np_a, m="Mixed_5b"), (6, 5, 192)),
    "Mixed_6a": (inception.InceptionB(), functools.partial(_np_b, m="Mixed_6a"), (7, 6, 288)),
    "Mixed_6c": (inception.InceptionC(160), functools.partial(_np_c, m="Mixed_6c"), (6, 5, 768)),
    "Mixed_7a": (inception.InceptionD(), functools.partial(_np_d, m="Mixed_7a"), (7, 6, 768)),
    "Mixed_7b": (inception.InceptionE(max_pool=False), functools.partial(_np_e, m="Mixed_7b", max_pool=False),
                 (4, 3, 1280)),
    "Mixed_7c": (inception.InceptionE(max_pool=True), functools.partial(_np_e, m="Mixed_7c", max_pool=True),
                 (4, 3, 2048)),
}


@pytest.mark.parametrize("name", list(_BLOCKS))
def test_blocks_match_numpy_reference(weights, name):
    """Each block kind (and the stem) with converted random weights against torch semantics."""
    sd, params = weights
    module, reference, (h, w, c) = _BLOCKS[name]
    x = np.random.default_rng(1).uniform(-1, 1, (2, h, w, c)).astype(np.float32)
    if module is None:
        got = jax.jit(functools.partial(inception.FIDInceptionV3().apply, method="stem"))({"params": params}, x)
    else:
        got = jax.jit(module.apply)({"params": params[name]}, x)
    _assert_close(got, reference(x.astype(np.float64), sd))


def test_bfloat16_compute_is_close(weights):
    _, params = weights
    x = np.random.default_rng(9).uniform(-1, 1, (2, 6, 5, 192)).astype(np.float32)
    f32, bf16 = jax.jit(lambda p, x: (inception.InceptionA(32).apply(p, x),
                                      inception.InceptionA(32, jnp.bfloat16).apply(p, x)))({"params": params["Mixed_5b"]}, x)
    assert bf16.dtype == jnp.bfloat16
    _assert_close(bf16.astype(jnp.float32), f32, 3e-2)


def _features_and_logits(model, x):
    features = model(x)
    return features, model.fc(features)


def test_whole_network_matches_numpy_reference(weights):
    """Block order, widths, the E_1 / E_2 pools, the global pool and fc, at the smallest size (75 px)."""
    sd, params = weights
    x = np.random.default_rng(2).uniform(-1, 1, (2, 75, 75, 3)).astype(np.float32)
    apply = functools.partial(inception.FIDInceptionV3().apply, method=_features_and_logits)
    features, logits = jax.jit(apply)({"params": params}, x)
    want_logits, want_features = _np_logits_and_features(x.astype(np.float64), sd)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008) and logits.dtype == jnp.float32
    _assert_close(features, want_features)
    _assert_close(logits, want_logits)


def test_inception_input_is_torch_bilinear_resize():
    rng = np.random.default_rng(3)
    for h, w in ((37, 50), (400, 320), (350, 200), (299, 299)):  # up, down, mixed, identity
        x = rng.uniform(0, 1, (2, h, w, 3)).astype(np.float32)
        got = np.asarray(fid.inception_input(x))
        assert got.shape == (2, 299, 299, 3)
        np.testing.assert_allclose(got, 2 * _np_torch_bilinear(x, 299, 299) - 1, atol=5e-7)
    with pytest.raises(ValueError, match="NHWC"):
        fid.inception_input(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="float images"):
        fid.inception_input(np.zeros((1, 64, 64, 3), np.uint8))


def test_inception_features_and_logits(weights, outputs8):
    """The public functions: (B, 2048) float32 features of any-size images, logits = fc(features)."""
    sd, _ = weights
    _, feats, logits = outputs8
    assert feats.shape == (8, 2048) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert np.abs(feats[0] - feats[-1]).max() > 1e-2 * np.abs(feats).max()  # the images do differ
    assert logits.shape == (8, 1008) and logits.dtype == np.float32
    _assert_close(logits, feats.astype(np.float64) @ sd["fc.weight"].T.astype(np.float64) + sd["fc.bias"], 1e-5)


def test_converter_reports_all_bad_keys_at_once(weights):
    sd, _ = weights
    bad = dict(sd)
    del bad["Mixed_6e.branch7x7dbl_4.bn.running_var"]
    bad["Mixed_5b.branch1x1.conv.bias"] = np.zeros(64, np.float32)
    bad["Mixed_6a.branch3x3.conv.weight"] = np.zeros((384, 288, 1, 3), np.float32)
    with pytest.raises(ValueError) as e:
        torch_convert.inception_params_from_state_dict(bad)
    msg = str(e.value)
    assert "missing Mixed_6e.branch7x7dbl_4.bn.running_var" in msg
    assert "unexpected Mixed_5b.branch1x1.conv.bias" in msg
    assert "Mixed_6a.branch3x3.conv.weight: shape (384, 288, 1, 3), expected (384, 288, 3, 3)" in msg
    no_counters = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert len(no_counters) == len(inception.param_shapes()) == 472  # every key but the counters used.
    torch_convert.inception_params_from_state_dict(no_counters)  # counters are optional.


def test_load_inception_params(weights, tmp_path):
    sd, params = weights
    path = str(tmp_path / "inception.msgpack")
    torch_convert.save_params(params, path)
    loaded = fid.load_inception_params(path)
    np.testing.assert_array_equal(loaded["Mixed_7c"]["branch_pool"]["kernel"],
                                  sd["Mixed_7c.branch_pool.conv.weight"].transpose(2, 3, 1, 0))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(loaded))
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth.*torch_convert inception"):
        fid.load_inception_params(str(tmp_path / "absent.msgpack"))
    broken = jax.tree.map(np.asarray, params)
    broken["fc"]["kernel"] = broken["fc"]["kernel"][:, :1000]
    del broken["Mixed_5b"]["branch_pool"]["var"]
    torch_convert.save_params(broken, path)
    with pytest.raises(ValueError, match=r"missing Mixed_5b/branch_pool/var.*fc/kernel: shape \(2048, 1000\)"):
        fid.load_inception_params(path)


# ----------------------------------------------------------------------------------------------
# Streamed statistics.
# ----------------------------------------------------------------------------------------------
def test_feature_stats_match_np_cov_with_large_offset():
    """float32 batches with features 1e3 +- 1 and padding rows of garbage: float64 mean and cov."""
    rng = np.random.default_rng(4)
    d = 16
    feats = (1e3 + rng.standard_normal((100, d)) @ rng.standard_normal((d, d)) / 4).astype(np.float32)
    moments = jax.jit(fid.batch_moments)
    stats, kept = fid.FeatureStats(d), []
    for start in range(0, 100, 8):  # 13 batches of 8 rows, the last one half padding
        rows = feats[start:start + 8]
        valid = np.zeros(8, bool)
        valid[:len(rows)] = rng.uniform(size=len(rows)) < 0.8
        batch = np.zeros((8, d), np.float32)
        batch[:len(rows)] = rows
        batch[~valid] = np.where(rng.uniform(size=(int((~valid).sum()), d)) < 0.5, np.nan, 1e30)
        stats.update(moments(batch, valid))
        kept.append(batch[valid])
    kept = np.concatenate(kept).astype(np.float64)
    assert stats.count == len(kept) < 100
    np.testing.assert_allclose(stats.mu(), kept.mean(axis=0), rtol=2e-7)  # float32 batch means
    cov = np.cov(kept, rowvar=False)
    assert np.abs(stats.sigma() - cov).max() <= 1e-4 * np.abs(cov).max()
    # A batch of padding only changes nothing; bad shapes are named.
    stats.update(moments(np.zeros((8, d), np.float32), np.zeros(8, bool)))
    assert stats.count == len(kept)
    with pytest.raises(ValueError, match="FeatureStats\\(dim=16\\)"):
        stats.update(moments(np.zeros((8, 4), np.float32), np.ones(8, bool)))
    with pytest.raises(ValueError, match="at least 2"):
        fid.FeatureStats(d).sigma()


def test_batch_moments_on_mesh_equal_one_device():
    rng = np.random.default_rng(5)
    feats = (50 + rng.standard_normal((16, 12))).astype(np.float32)
    valid = rng.uniform(size=16) < 0.7
    one = jax.jit(fid.batch_moments)(feats, valid)
    mesh = sharding.make_mesh((8, 1, 1))
    sharded = jax.jit(fid.batch_moments)(jax.device_put(feats, sharding.batch_sharding(mesh, 2)),
                                         jax.device_put(valid, sharding.batch_sharding(mesh, 1)))
    for a, b in zip(sharded, one):
        assert a.sharding.is_fully_replicated
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_feature_sums_on_mesh_match_np_cov(weights, outputs8):
    """The jitted per-batch step on 8 devices, batch sharded over (data, fsdp), padding rows masked."""
    _, params = weights
    x, feats, _ = outputs8
    valid = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
    mesh = sharding.make_mesh((8, 1, 1))
    moments = fid.feature_sums(jax.device_put(params, NamedSharding(mesh, P())),
                               jax.device_put(x, sharding.batch_sharding(mesh, 4)),
                               jax.device_put(valid, sharding.batch_sharding(mesh, 1)))
    assert all(a.sharding.is_fully_replicated for a in moments)
    stats = fid.FeatureStats()
    stats.update(moments)
    kept = feats[valid].astype(np.float64)
    assert stats.count == 6
    np.testing.assert_allclose(stats.mu(), kept.mean(axis=0), rtol=1e-5, atol=1e-6 * np.abs(kept).max())
    cov = np.cov(kept, rowvar=False)
    assert np.abs(stats.sigma() - cov).max() <= 1e-4 * np.abs(cov).max()


# ----------------------------------------------------------------------------------------------
# Frechet distance.
# ----------------------------------------------------------------------------------------------
def frechet_stand_in(mu1, sigma1, mu2, sigma2):
    """For tests of evaluators' wiring: cheap and sensitive to all four arguments. scipy's sqrtm
    of a 2048 x 2048 product takes 10-20 s on a test CPU (twice for the singular covariances of a
    few images), and frechet_distance has its own tests (below)."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    return float(((mu1 - mu2) ** 2).sum() + np.abs(sigma1 - sigma2).sum() + 1e-3 * np.trace(sigma1))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(6)
    mu1, mu2 = rng.standard_normal((2, 6))
    a, b = rng.uniform(0.1, 3.0, (2, 6))
    want = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    np.testing.assert_allclose(fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), want, rtol=1e-10)
    # Commuting full covariances share eigenvectors: the square root acts on eigenvalues.
    q = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    got = fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    np.testing.assert_allclose(got, want, rtol=1e-8)
    assert fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu1, q @ np.diag(a) @ q.T) == pytest.approx(0, abs=1e-9)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_frechet_distance_singular_product_retries_with_eps():
    s1 = np.array([[8.0, -4, -2], [-4, 4, 0], [-2, 0, 1]])  # PSD, rank 2
    s2 = np.array([[5.0, 5, 3], [5, 5, 3], [3, 3, 5]])  # PSD, rank 2; s1 s2 has a defective eigenvalue 0
    assert not np.isfinite(scipy.linalg.sqrtm(s1 @ s2)).all()  # the case the retry exists for
    mu1, mu2 = np.zeros(3), np.array([1.0, 0, 2])
    eps = 1e-6
    a, b = s1 + eps * np.eye(3), s2 + eps * np.eye(3)
    root_a = scipy.linalg.sqrtm(a).real
    # A B is similar to A^1/2 B A^1/2 (symmetric PSD): tr (A B)^1/2 = sum of sqrt of its eigenvalues.
    tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ b @ root_a), 0, None)))
    want = 5.0 + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    got = fid.frechet_distance(mu1, s1, mu2, s2, eps=eps)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_frechet_distance_imaginary_part_and_shapes():
    mu = np.zeros(2)
    with pytest.raises(ValueError, match="imaginary component"):
        fid.frechet_distance(mu, np.diag([-1.0, 1.0]), mu, np.eye(2))
    # An imaginary part below 1e-3 is rounding: dropped (sqrt(-1e-8) = 1e-4 i).
    np.testing.assert_allclose(fid.frechet_distance(mu, np.diag([-1e-8, 1.0]), mu, np.eye(2)), 1 - 1e-8, rtol=1e-12)
    with pytest.raises(ValueError, match=r"equal length.*\(2,\) and \(3,\)"):
        fid.frechet_distance(mu, np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"\(2, 2\).*sigma2 has shape \(3, 3\)"):
        fid.frechet_distance(mu, np.eye(2), mu, np.eye(3))


# ----------------------------------------------------------------------------------------------
# Statistics files.
# ----------------------------------------------------------------------------------------------
def test_stats_files(tmp_path):
    rng = np.random.default_rng(8)
    mu, sigma = rng.standard_normal(8), np.cov(rng.standard_normal((20, 8)), rowvar=False)
    ours = str(tmp_path / "ours.stats")  # no '.npz' appended
    fid.save_stats(ours, mu, sigma)
    got_mu, got_sigma = fid.load_reference_stats(ours, dim=8)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    # ADM's reference batches: images and spatial statistics next to mu / sigma.
    adm = str(tmp_path / "VIRTUAL_ref.npz")
    np.savez(adm, arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu.astype(np.float32), sigma=sigma,
             mu_s=np.zeros(3), sigma_s=np.eye(3))
    got_mu, got_sigma = fid.load_reference_stats(adm, dim=8)
    np.testing.assert_allclose(got_mu, mu, rtol=1e-6)
    assert got_mu.dtype == np.float64
    np.testing.assert_array_equal(got_sigma, sigma)

    with pytest.raises(FileNotFoundError, match="absent.npz"):
        fid.load_reference_stats(str(tmp_path / "absent.npz"))
    with pytest.raises(ValueError, match=r"expected mu \(2048,\).*got mu \(8,\)"):
        fid.load_reference_stats(adm)
    np.savez(adm, arr_0=np.zeros(3), mu_s=np.zeros(3))
    with pytest.raises(ValueError, match="missing mu, sigma"):
        fid.load_reference_stats(adm)
    np.save(str(tmp_path / "single.npy"), mu)
    with pytest.raises(ValueError, match="single .npy array"):
        fid.load_reference_stats(str(tmp_path / "single.npy"))
    with pytest.raises(ValueError, match=r"sigma \(8, 7\)"):
        fid.save_stats(ours, mu, sigma[:, :7])
