"""Convert torch weight files into Flax params files (torch is needed here only, never to train).

LPIPS-VGG16 needs two files:
  * torchvision's VGG16 ImageNet weights, https://download.pytorch.org/models/vgg16-397923af.pth
  * the LPIPS v0.1 linear heads, `lpips/weights/v0.1/vgg.pth` inside the `lpips` wheel
    (`pip download lpips --no-deps`, then unzip the .whl; it is a zip file).

    python -m vtp_jax.checkpoints.torch_convert lpips \\
        --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg16.msgpack

The FID Inception-v3 needs pytorch-fid's port of TF's Inception graph,
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

    python -m vtp_jax.checkpoints.torch_convert inception \\
        --pth pt_inception-2015-12-05-6726825d.pth --out inception.msgpack
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
from flax import serialization, traverse_util

from vtp_jax import paths
from vtp_jax.checkpoints import check_shapes
from vtp_jax.models import inception as inception_lib
from vtp_jax.models import lpips as lpips_lib

# torchvision's vgg16().features indices of the 13 convs, in the order conv1_1 ... conv5_3.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def _vgg_conv_names():
    return [f"conv{b}_{i}" for b, widths in enumerate(lpips_lib.VGG16_BLOCKS, start=1)
            for i in range(1, len(widths) + 1)]


def lpips_params_from_state_dicts(vgg_sd: dict[str, np.ndarray], lin_sd: dict[str, np.ndarray]):
    """Flax LPIPS params from torchvision VGG16 and lpips `vgg.pth` state dicts (NumPy arrays).

    Conv weights go OIHW -> HWIO; each lin head's (1, C, 1, 1) weight becomes a (C, 1) kernel.
    The VGG classifier is not part of LPIPS and is ignored; any other surplus or missing key
    is an error, reported together with shape mismatches.
    """
    problems = []

    def take(sd, key, src):
        if key not in sd:
            problems.append(f"{src}: missing {key}")
            return None
        return np.asarray(sd[key], np.float32)

    vgg = {}
    for name, idx in zip(_vgg_conv_names(), VGG16_CONV_INDICES):
        w = take(vgg_sd, f"features.{idx}.weight", "vgg")
        b = take(vgg_sd, f"features.{idx}.bias", "vgg")
        if w is not None and b is not None:
            if w.ndim != 4:
                problems.append(f"vgg: features.{idx}.weight has shape {w.shape}, expected (O, I, 3, 3)")
                continue
            vgg[name] = {"kernel": w.transpose(2, 3, 1, 0), "bias": b}
    used = {f"features.{i}.{p}" for i in VGG16_CONV_INDICES for p in ("weight", "bias")}
    problems += [f"vgg: unexpected {k}" for k in vgg_sd if k not in used and not k.startswith("classifier.")]

    params = {"vgg": vgg}
    for i, tap in enumerate(lpips_lib.LPIPS_TAPS):
        w = take(lin_sd, f"lin{i}.model.1.weight", "lin")
        if w is None:
            continue
        if w.ndim != 4 or w.shape[0] != 1 or w.shape[2:] != (1, 1):
            problems.append(f"lin: lin{i}.model.1.weight has shape {w.shape}, expected (1, C, 1, 1)")
            continue
        params[f"lin_{tap}"] = {"kernel": w.reshape(-1, 1)}
    lin_keys = {f"lin{i}.model.1.weight" for i in range(len(lpips_lib.LPIPS_TAPS))}
    problems += [f"lin: unexpected {k}" for k in lin_sd if k not in lin_keys]
    if problems:
        raise ValueError("cannot convert LPIPS weights: " + "; ".join(problems))
    check_shapes(params, lpips_lib.param_shapes(), "converted LPIPS weights", "LPIPS-VGG16")
    return params


# Our ConvBN leaves <- the BatchNorm2d entries of torchvision's BasicConv2d (`<name>.bn.<entry>`).
_BN_ENTRIES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _inception_source(path: str, shape: tuple[int, ...]):
    """(torch key, torch shape, torch array -> Flax array) of one Flax parameter path."""
    *module, leaf = path.split("/")
    name = ".".join(module)
    if name == "fc":
        if leaf == "kernel":
            return "fc.weight", shape[::-1], np.transpose
        return "fc.bias", shape, np.asarray
    if leaf == "kernel":
        return f"{name}.conv.weight", (shape[3], shape[2], shape[0], shape[1]), lambda w: w.transpose(2, 3, 1, 0)
    return f"{name}.bn.{_BN_ENTRIES[leaf]}", shape, np.asarray


def inception_params_from_state_dict(sd: dict[str, np.ndarray]):
    """Flax FID Inception params from pytorch-fid's FID Inception-v3 state dict (NumPy arrays).

    Each BasicConv2d `<name>.conv.weight` goes OIHW -> HWIO to `<name>/kernel`, its BatchNorm's
    weight / bias / running_mean / running_var to `<name>/scale`, `bias`, `mean`, `var`; `fc.weight`
    is transposed. BatchNorm's `num_batches_tracked` counters are ignored; every other key must be
    used, and all missing, unexpected and mis-shaped keys are reported together.
    """
    problems, flat, used = [], {}, set()
    for path, shape in inception_lib.param_shapes().items():
        key, torch_shape, to_flax = _inception_source(path, shape)
        used.add(key)
        if key not in sd:
            problems.append(f"missing {key} {torch_shape}")
            continue
        w = np.asarray(sd[key], np.float32)
        if w.shape != torch_shape:
            problems.append(f"{key}: shape {w.shape}, expected {torch_shape}")
            continue
        flat[tuple(path.split("/"))] = to_flax(w)
    counters = {k.rsplit(".", 1)[0] + ".num_batches_tracked" for k in used if k.endswith(".bn.weight")}
    problems += [f"unexpected {k}" for k in sd if k not in used and k not in counters]
    if problems:
        raise ValueError("cannot convert FID Inception weights: " + "; ".join(problems))
    params = traverse_util.unflatten_dict(flat)
    check_shapes(params, inception_lib.param_shapes(), "converted FID Inception weights", "FID Inception-v3")
    return params


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """A .pth state dict as float32 NumPy arrays; imports torch lazily."""
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading .pth files needs torch: pip install 'vtp-jax[torch]' "
                          "(only for this conversion)") from e
    if not paths.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {k: v.detach().float().numpy() for k, v in sd.items()}


def save_params(params, path: str) -> None:
    """Write a params pytree as Flax msgpack (what `objectives.load_lpips_params` and
    `evals.fid.load_inception_params` read)."""
    with paths.open_file(path, "wb") as f:
        f.write(serialization.msgpack_serialize(params))


def convert_lpips(vgg_path: str, lin_path: str, out_path: str) -> None:
    params = lpips_params_from_state_dicts(read_torch_state_dict(vgg_path), read_torch_state_dict(lin_path))
    save_params(params, out_path)


def convert_inception(pth_path: str, out_path: str) -> None:
    save_params(inception_params_from_state_dict(read_torch_state_dict(pth_path)), out_path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtp_jax.checkpoints.torch_convert",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    lp = sub.add_parser("lpips", help="VGG16 + LPIPS v0.1 lin heads -> Flax LPIPS params (msgpack)")
    lp.add_argument("--vgg", required=True, help="torchvision vgg16-397923af.pth")
    lp.add_argument("--lin", required=True, help="lpips/weights/v0.1/vgg.pth from the lpips wheel")
    lp.add_argument("--out", required=True, help="output .msgpack for objectives.lpips_params")
    inc = sub.add_parser("inception", help="pytorch-fid's FID Inception-v3 -> Flax params (msgpack)")
    inc.add_argument("--pth", required=True, help="pt_inception-2015-12-05-6726825d.pth from pytorch-fid's releases")
    inc.add_argument("--out", required=True, help="output .msgpack for evals.fid.load_inception_params")
    args = parser.parse_args(argv)
    try:
        if args.what == "lpips":
            convert_lpips(args.vgg, args.lin, args.out)
        else:
            convert_inception(args.pth, args.out)
    except (OSError, ImportError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
