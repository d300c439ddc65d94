"""L1, LPIPS (Flax VGG16 + lin heads), reconstruction_loss, LPIPS weight files and the converter.

The LPIPS reference below is written from the paper and torchvision's VGG16 layout in NumPy
(float64, im2col convs), with random weights in the torch layout, so that the Flax network and
the converter's key / layout mapping are both checked against something independent.
"""
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from numpy.lib.stride_tricks import sliding_window_view

from vtp_jax import objectives
from vtp_jax.checkpoints import torch_convert

# torchvision's vgg16 `features` config ('D'); LPIPS taps the ReLUs that end each block.
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
LPIPS_SLICE_ENDS = (4, 9, 16, 23, 30)  # lpips.pretrained_networks.vgg16 slice boundaries.
LIN_CHANNELS = (64, 128, 256, 512, 512)


def _torch_layout_weights(seed=0):
    rng = np.random.default_rng(seed)
    vgg, cin, i = {}, 3, 0
    for v in VGG16_CFG:
        if v == "M":
            i += 1
            continue
        he_std = np.sqrt(2.0 / (9 * cin))  # keeps activations O(1) through 13 random convs.
        vgg[f"features.{i}.weight"] = (he_std * rng.standard_normal((v, cin, 3, 3))).astype(np.float32)
        vgg[f"features.{i}.bias"] = (0.05 * rng.standard_normal(v)).astype(np.float32)
        cin, i = v, i + 2
    vgg["classifier.0.weight"] = rng.standard_normal((4, 8)).astype(np.float32)  # unused by LPIPS.
    lin = {f"lin{k}.model.1.weight": rng.uniform(0, 1, (1, c, 1, 1)).astype(np.float32)
           for k, c in enumerate(LIN_CHANNELS)}
    return vgg, lin


def _np_lpips(vgg, lin, x, y):
    """LPIPS v0.1 from the paper, torch layouts, NCHW-free NumPy in float64."""
    shift = np.array([-0.030, -0.088, -0.188])
    scale = np.array([0.458, 0.448, 0.450])
    h = (np.concatenate([x, y]).astype(np.float64) - shift) / scale
    taps, layer = [], 0
    for v in VGG16_CFG:
        if v == "M":
            n, hh, ww, c = h.shape
            h = h.reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
            layer += 1
        else:
            w = vgg[f"features.{layer}.weight"].astype(np.float64)
            b = vgg[f"features.{layer}.bias"].astype(np.float64)
            win = sliding_window_view(np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), axis=(1, 2))
            h = np.maximum(np.tensordot(win, w, axes=([3, 4, 5], [1, 2, 3])) + b, 0.0)
            layer += 2
        if layer in LPIPS_SLICE_ENDS:
            taps.append(h)
    b = x.shape[0]
    d = np.zeros(b)
    for k, f in enumerate(taps):
        f = f / (np.sqrt((f ** 2).sum(-1, keepdims=True)) + 1e-10)
        diff = (f[:b] - f[b:]) ** 2
        d += (diff @ lin[f"lin{k}.model.1.weight"].reshape(-1).astype(np.float64)).mean(axis=(1, 2))
    return d


@pytest.fixture(scope="module")
def weights():
    vgg, lin = _torch_layout_weights()
    return vgg, lin, torch_convert.lpips_params_from_state_dicts(vgg, lin)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
    return x, y


def test_lpips_matches_numpy_reference(weights, images):
    vgg, lin, params = weights
    x, y = images
    got = np.asarray(jax.jit(objectives.lpips)(params, x, y))
    want = _np_lpips(vgg, lin, x, y)
    assert got.shape == (2,)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # Distance properties that a mis-split [x; y] batch would break.
    np.testing.assert_allclose(np.asarray(objectives.lpips(params, y, x)), got, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(objectives.lpips(params, x, x)), 0.0, atol=1e-7)


def test_lpips_bfloat16_compute_is_close(weights, images):
    _, _, params = weights
    x, y = images
    f32 = np.asarray(objectives.lpips(params, x, y))
    bf16 = np.asarray(objectives.lpips(params, x, y, dtype=jnp.bfloat16))
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, f32, rtol=5e-2)


def test_lpips_gradient_matches_finite_differences(weights, images):
    """d LPIPS / d x along a random direction against float64 central differences of the reference."""
    vgg, lin, params = weights
    x, y = images[0][:1], images[1][:1]
    g = np.asarray(jax.jit(jax.grad(lambda x: objectives.lpips(params, x, y)[0]))(x), np.float64)
    direction = np.random.default_rng(2).standard_normal(x.shape)
    eps = 1e-6  # ReLU / max-pool kinks lie within ~1e-5 of this input; float64 allows tiny steps.
    fd = (_np_lpips(vgg, lin, x + eps * direction, y)[0] - _np_lpips(vgg, lin, x - eps * direction, y)[0]) / (2 * eps)
    np.testing.assert_allclose(np.sum(g * direction), fd, rtol=1e-4)


def test_lpips_rejects_bad_images(weights):
    _, _, params = weights
    ok = np.zeros((1, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="equal shape"):
        objectives.lpips(params, ok, np.zeros((1, 32, 16, 3), np.float32))
    with pytest.raises(ValueError, match="NHWC"):
        objectives.lpips(params, ok.transpose(0, 3, 1, 2), ok.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="at least 16x16"):
        objectives.lpips(params, ok[:, :8, :8], ok[:, :8, :8])


def test_l1_loss_matches_numpy():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((2, 3, 4, 5, 3)).astype(np.float32)
    want = np.array([np.abs(x[i].astype(np.float64) - y[i]).sum() / x[i].size for i in range(3)])
    got = np.asarray(objectives.l1_loss(x, y))
    assert got.shape == (3,)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="equal shape"):
        objectives.l1_loss(x, y[:2])


def test_reconstruction_loss_weights_parts(weights, images):
    vgg, lin, params = weights
    x, y = images
    l1 = np.abs(x.astype(np.float64) - y).mean()
    lp = _np_lpips(vgg, lin, x, y).mean()
    loss, parts = objectives.reconstruction_loss(params, x, y, l1_weight=0.5, lpips_weight=2.0)
    np.testing.assert_allclose(float(loss), 0.5 * l1 + 2.0 * lp, rtol=1e-4)
    np.testing.assert_allclose(float(parts["l1"]), l1, rtol=1e-5)
    np.testing.assert_allclose(float(parts["lpips"]), lp, rtol=1e-4)
    # Without LPIPS no weights are needed and the VGG does not run.
    loss, parts = objectives.reconstruction_loss(None, x, y, l1_weight=3.0, lpips_weight=0.0)
    assert set(parts) == {"l1"}
    np.testing.assert_allclose(float(loss), 3.0 * l1, rtol=1e-5)
    with pytest.raises(ValueError, match="no LPIPS params"):
        objectives.reconstruction_loss(None, x, y, lpips_weight=1.0)


def test_converter_layout():
    vgg, lin = _torch_layout_weights(seed=4)
    params = torch_convert.lpips_params_from_state_dicts(vgg, lin)
    w = vgg["features.28.weight"]  # conv5_3, OIHW
    k = np.asarray(params["vgg"]["conv5_3"]["kernel"])  # HWIO
    for o, i, r, c in [(0, 0, 0, 0), (511, 3, 2, 1), (7, 400, 1, 2)]:
        assert k[r, c, i, o] == w[o, i, r, c]
    np.testing.assert_array_equal(params["vgg"]["conv2_1"]["bias"], vgg["features.5.bias"])
    np.testing.assert_array_equal(params["lin_relu3_3"]["kernel"][:, 0], lin["lin2.model.1.weight"][0, :, 0, 0])


def test_converter_reports_every_problem():
    vgg, lin = _torch_layout_weights(seed=5)
    del vgg["features.7.bias"]
    vgg["features.12.weight"] = vgg["features.12.weight"][:, :10]
    vgg["features.31.weight"] = np.zeros(3, np.float32)
    lin["lin4.model.1.weight"] = np.zeros((2, 512, 1, 1), np.float32)
    with pytest.raises(ValueError) as e:
        torch_convert.lpips_params_from_state_dicts(vgg, lin)
    msg = str(e.value)
    for part in ("missing features.7.bias", "unexpected features.31.weight", "lin4.model.1.weight has shape"):
        assert part in msg
    vgg, lin = _torch_layout_weights(seed=5)
    vgg["features.12.weight"] = vgg["features.12.weight"][:, :10]
    with pytest.raises(ValueError, match=r"vgg/conv3_2/kernel: shape \(3, 3, 10, 256\)"):
        torch_convert.lpips_params_from_state_dicts(vgg, lin)


def test_load_lpips_params_round_trip_and_errors(weights, tmp_path):
    _, _, params = weights
    path = tmp_path / "lpips.msgpack"
    torch_convert.save_params(params, str(path))
    loaded = objectives.load_lpips_params(str(path))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)

    for missing in (str(tmp_path / "absent.msgpack"), ""):
        with pytest.raises(FileNotFoundError) as e:
            objectives.load_lpips_params(missing)
        for hint in ("https://download.pytorch.org/models/vgg16-397923af.pth",
                     "lpips/weights/v0.1/vgg.pth", "vtp_jax.checkpoints.torch_convert lpips"):
            assert hint in str(e.value)

    garbage = tmp_path / "garbage.msgpack"
    garbage.write_bytes(b"\xc1not msgpack")
    with pytest.raises(ValueError, match="not a Flax msgpack"):
        objectives.load_lpips_params(str(garbage))

    partial = tmp_path / "partial.msgpack"
    partial.write_bytes(serialization.msgpack_serialize({"vgg": params["vgg"]}))
    with pytest.raises(ValueError, match="missing lin_relu1_2/kernel"):
        objectives.load_lpips_params(str(partial))


class _Tensor:
    """What read_torch_state_dict uses of a torch tensor."""

    def __init__(self, a):
        self.a = a

    def detach(self):
        return self

    def float(self):
        return _Tensor(self.a.astype(np.float32))

    def numpy(self):
        return self.a


def test_cli_converts_torch_files(tmp_path, capsys, monkeypatch):
    """The CLI end to end without torch: torch.load (torch's own reader, the [torch] extra) is a
    stand-in module returning the state dicts the test wrote; everything after it is ours."""
    calls = []

    def load(path, map_location=None, weights_only=False):
        calls.append((os.path.basename(path), map_location, weights_only))
        with np.load(path) as f:
            return {k: _Tensor(f[k]) for k in f.files}

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=load))
    vgg, lin = _torch_layout_weights(seed=6)
    for name, sd in (("vgg16.pth", vgg), ("vgg.pth", lin)):
        with open(tmp_path / name, "wb") as f:
            np.savez(f, **{k: v.astype(np.float16) if k.startswith("lin0") else v for k, v in sd.items()})
    out = tmp_path / "lpips.msgpack"
    assert torch_convert.main(["lpips", "--vgg", str(tmp_path / "vgg16.pth"),
                               "--lin", str(tmp_path / "vgg.pth"), "--out", str(out)]) == 0
    assert calls == [("vgg16.pth", "cpu", True), ("vgg.pth", "cpu", True)]  # weights only: no code in the file runs
    loaded = objectives.load_lpips_params(str(out))
    lin["lin0.model.1.weight"] = lin["lin0.model.1.weight"].astype(np.float16).astype(np.float32)
    jax.tree.map(np.testing.assert_array_equal, loaded, torch_convert.lpips_params_from_state_dicts(vgg, lin))
    with pytest.raises(SystemExit) as e:
        torch_convert.main(["lpips", "--vgg", str(tmp_path / "absent.pth"), "--lin", str(tmp_path / "vgg.pth"),
                            "--out", str(out)])
    assert e.value.code == 2 and "absent.pth' does not exist" in capsys.readouterr().err
