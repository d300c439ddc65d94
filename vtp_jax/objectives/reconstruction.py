"""Pixel reconstruction objectives: L_rec = l1_weight * L1 + lpips_weight * LPIPS(VGG16).

Images are NHWC RGB in [-1, 1] (the LPIPS convention). LPIPS weights are a Flax params file made
once from torch files by `python -m vtp_jax.checkpoints.torch_convert lpips`; training never
needs torch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from vtp_jax.checkpoints import load_converted
from vtp_jax.models import lpips as lpips_lib

__all__ = ["l1_loss", "lpips", "reconstruction_loss", "load_lpips_params", "abstract_lpips_params"]

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LIN_FILE = "lpips/weights/v0.1/vgg.pth"  # inside the `lpips` pip wheel.

_HOW_TO_CONVERT = (
    "Make it once (needs torch: pip install 'vtp-jax[torch]'): download torchvision's VGG16 "
    f"ImageNet weights {VGG16_URL}; take the LPIPS v0.1 linear heads `{LPIPS_LIN_FILE}` from the "
    "`lpips` wheel (pip download lpips --no-deps, then unzip the .whl); then run `python -m "
    "vtp_jax.checkpoints.torch_convert lpips --vgg vgg16-397923af.pth --lin vgg.pth --out "
    "lpips_vgg16.msgpack` and point objectives.lpips_params at the output.")


def l1_loss(x, y):
    """(B,) mean absolute error of each image over all its pixels and channels."""
    if x.shape != y.shape or x.ndim < 2:
        raise ValueError(f"l1_loss needs two batches of equal shape (B, ...), got {x.shape} and {y.shape}")
    d = jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))
    return jnp.mean(d.reshape(d.shape[0], -1), axis=1)


def lpips(params, x, y, dtype=jnp.float32):
    """(B,) LPIPS-VGG16 ("lin" v0.1) distances; `dtype` is the VGG compute dtype (heads stay f32)."""
    return lpips_lib.LPIPS(dtype=dtype).apply({"params": params}, x, y)


def reconstruction_loss(lpips_params, x, y, l1_weight=1.0, lpips_weight=1.0, dtype=jnp.float32):
    """(scalar batch-mean L_rec, {'l1', 'lpips'} batch means). lpips_weight=0 skips the VGG."""
    if lpips_weight and lpips_params is None:
        raise ValueError(f"reconstruction_loss: lpips_weight={lpips_weight} but no LPIPS params; "
                         "load them with load_lpips_params or set lpips_weight=0")
    parts = {"l1": jnp.mean(l1_loss(x, y))}
    loss = l1_weight * parts["l1"]
    if lpips_weight:
        parts["lpips"] = jnp.mean(lpips(lpips_params, x, y, dtype))
        loss = loss + lpips_weight * parts["lpips"]
    return loss, parts


def load_lpips_params(path: str):
    """The LPIPS params pytree from a converted file, checked against the module's shapes."""
    return load_converted(path, lpips_lib.param_shapes(), "LPIPS-VGG16", _HOW_TO_CONVERT)


def abstract_lpips_params(sharding):
    """The LPIPS params pytree as ShapeDtypeStructs placed by `sharding`: what a step compiles
    against without the weights file (the compile plan, memory benchmarks)."""
    nested = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in lpips_lib.param_shapes().items()})
    return jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding), nested,
                        is_leaf=lambda x: isinstance(x, tuple))
