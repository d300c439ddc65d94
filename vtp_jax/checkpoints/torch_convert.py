"""Convert torch weight files into Flax params files (torch is needed here only, never to train).

LPIPS-VGG16 needs two files:
  * torchvision's VGG16 ImageNet weights, https://download.pytorch.org/models/vgg16-397923af.pth
  * the LPIPS v0.1 linear heads, `lpips/weights/v0.1/vgg.pth` inside the `lpips` wheel
    (`pip download lpips --no-deps`, then unzip the .whl; it is a zip file).

    python -m vtp_jax.checkpoints.torch_convert lpips \\
        --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg16.msgpack
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from flax import serialization

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
    lpips_lib.check_params(params, "converted LPIPS weights")
    return params


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """A .pth state dict as float32 NumPy arrays; imports torch lazily."""
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading .pth files needs torch: pip install 'vtp-jax[torch]' "
                          "(only for this conversion)") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {k: v.detach().float().numpy() for k, v in sd.items()}


def save_params(params, path: str) -> None:
    """Write a params pytree as Flax msgpack (what `objectives.load_lpips_params` reads)."""
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(params))


def convert_lpips(vgg_path: str, lin_path: str, out_path: str) -> None:
    params = lpips_params_from_state_dicts(read_torch_state_dict(vgg_path), read_torch_state_dict(lin_path))
    save_params(params, out_path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtp_jax.checkpoints.torch_convert",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    lp = sub.add_parser("lpips", help="VGG16 + LPIPS v0.1 lin heads -> Flax LPIPS params (msgpack)")
    lp.add_argument("--vgg", required=True, help="torchvision vgg16-397923af.pth")
    lp.add_argument("--lin", required=True, help="lpips/weights/v0.1/vgg.pth from the lpips wheel")
    lp.add_argument("--out", required=True, help="output .msgpack for objectives.lpips_params")
    args = parser.parse_args(argv)
    try:
        convert_lpips(args.vgg, args.lin, args.out)
    except (OSError, ImportError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
