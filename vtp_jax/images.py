"""The model's pixel space, written once: ImageNet normalisation and its inverses, image grids.

VTP (like the release) reads images ImageNet-normalised; losses and metrics want other ranges:
LPIPS and L1 [-1, 1], SSIM and Inception [0, 1], files uint8. Every conversion lives here and
works on NumPy and JAX arrays alike (channels last).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images) -> np.ndarray:
    """uint8 (..., 3) -> float32 ImageNet-normalised, the model's input space."""
    return ((np.asarray(images, np.float32) / 255.0 - np.array(IMAGENET_MEAN, np.float32))
            / np.array(IMAGENET_STD, np.float32))


def denormalize(x):
    """ImageNet-normalised -> [0, 1] RGB (unclipped; NumPy or JAX in, same out)."""
    return x * np.array(IMAGENET_STD, np.float32) + np.array(IMAGENET_MEAN, np.float32)


def to_lpips_range(x):
    """ImageNet-normalised -> [-1, 1], the LPIPS / taming convention the L1 and LPIPS weights assume."""
    return denormalize(x) * 2.0 - 1.0


def to_uint8(x) -> np.ndarray:
    """ImageNet-normalised -> uint8, rounded and clipped (on the host)."""
    rgb = np.asarray(x, np.float64) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def load_images(images, size: int = 256) -> np.ndarray:
    """(B, size, size, 3) float32 ImageNet-normalised model input from image files (paths) or uint8
    arrays (H, W, 3): the shorter side resized to `size` (bicubic), centre-cropped to a square, as
    ADM and the release's tools prepare images. One error names the image that cannot be used."""
    out = []
    for item in [images] if isinstance(images, (str, np.ndarray)) and np.ndim(images) != 4 else images:
        try:
            if isinstance(item, np.ndarray):
                im = Image.fromarray(np.asarray(item, np.uint8)).convert("RGB")
            else:
                with Image.open(item) as f:
                    im = ImageOps.exif_transpose(f).convert("RGB")
            scale = size / min(im.size)
            im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))),
                           Image.Resampling.BICUBIC)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            name = item if isinstance(item, str) else f"array of shape {np.shape(item)}"
            raise ValueError(f"{name}: cannot use this image ({type(e).__name__}: {e})") from None
        left, top = (im.width - size) // 2, (im.height - size) // 2
        out.append(np.asarray(im.crop((left, top, left + size, top + size))))
    return normalize(np.stack(out))


def to_pixels(x) -> np.ndarray:
    """Model output (ImageNet-normalised) -> uint8 images, what a file holds: `to_uint8`."""
    return to_uint8(x)


def side_by_side(columns: Sequence, n: int = 8) -> np.ndarray:
    """(rows, H, W * len(columns), 3) uint8: row i puts image i of every column next to each other
    (input | reconstruction | ...); each column an ImageNet-normalised batch."""
    n = min(n, len(columns[0]))
    return np.stack([np.concatenate([to_uint8(c[i]) for c in columns], 1) for i in range(n)])


def grid(images: np.ndarray, rows: int) -> np.ndarray:
    """(rows * cols, H, W, 3) -> one (rows * H, cols * W, 3) picture, row-major."""
    n, h, w, c = images.shape
    cols = n // rows
    return images[:rows * cols].reshape(rows, cols, h, w, c).swapaxes(1, 2).reshape(rows * h, cols * w, c)
