"""The model's pixel space, written once: ImageNet normalisation and its inverses, image grids,
and the one checked decoder of image files (`decode_image`, `open_image`).

VTP (like the release) reads images ImageNet-normalised; losses and metrics want other ranges:
LPIPS and L1 [-1, 1], SSIM and Inception [0, 1], files uint8. Every conversion lives here and
works on NumPy and JAX arrays alike (channels last).
"""
from __future__ import annotations

import io
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from vtp_jax import paths

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
    """(B, size, size, 3) float32 ImageNet-normalised model input from image files (paths, local or
    gs://, decoded by `open_image`) or uint8 arrays (H, W, 3): the shorter side resized to `size`
    (bicubic), centre-cropped to a square, as ADM and the release's tools prepare images. One error
    names the image that cannot be used."""
    out = []
    for item in [images] if isinstance(images, (str, np.ndarray)) and np.ndim(images) != 4 else images:
        if isinstance(item, np.ndarray):
            try:
                im = Image.fromarray(np.asarray(item, np.uint8)).convert("RGB")
            except (TypeError, ValueError) as e:
                raise ValueError(f"array of shape {np.shape(item)}: cannot use this image ({e})") from None
        else:
            im = open_image(item)
        scale = size / min(im.size)
        im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))),
                       Image.Resampling.BICUBIC)
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


# ------------------------------------------------------------------------------------------------
# Decoding: the one reader of image files and records, checked before any pixel is decoded.
# ------------------------------------------------------------------------------------------------
MAX_PIXELS = 89_478_485  # PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS), checked from the header
_EXIF_ORIENTATION = 0x0112

# Our own pixel limit (`max_pixels`) replaces PIL's global one, which would otherwise warn (or
# raise inside Image.open) on sizes we have already decided about.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


class DecodeError(ValueError):
    """Bytes that cannot become an image; `reason` names the counter it goes to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels are composited on white (their stored colour is
    often junk, e.g. black); 16/32-bit grey is rescaled rather than clipped at 255."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        values = np.asarray(img, np.float64)
        scale = 257.0 if (img.mode.startswith("I;16") or values.max(initial=0) > 255) else 1.0
        return Image.fromarray(np.clip(values / scale, 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS, min_side: int = 1,
                 draft_side: int = 0) -> tuple[Image.Image, list[str]]:
    """Encoded bytes -> an upright RGB PIL image, and the list of conversions applied.

    JPEGs are decoded at a reduced DCT scale when both sides stay >= `draft_side` (0: full size),
    which is most of the decode cost for large photos. Raises DecodeError naming the reason:
    empty_image, not_an_image, too_large (w * h > max_pixels, checked from the header before any
    pixel is decoded, so decompression bombs cost nothing), corrupt_image (truncated / bad data),
    too_small (a side < min_side after EXIF rotation).
    """
    if not data:
        raise DecodeError("empty_image")
    # PIL's format plugins raise many exception types on malformed input (OSError, SyntaxError,
    # struct.error, IndexError, ...); any of them means this record is unusable, never that the
    # run should stop, hence the broad excepts.
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise DecodeError("too_large", str(e)) from None
    except Exception as e:
        raise DecodeError("not_an_image", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise DecodeError("too_large", f"{w}x{h} > max_pixels={max_pixels}")
    conversions = []
    try:
        if draft_side and img.format == "JPEG":
            img.draft("RGB", (draft_side, draft_side))
        img.load()  # before getexif, which loads a PNG itself: a second load() of broken data passes silently
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # unreadable EXIF: the pixels are fine
            orientation = 1
        if orientation in range(2, 9):  # 1 is upright; other values are not orientations
            img = ImageOps.exif_transpose(img)
            conversions.append("exif_rotated")
        if img.mode != "RGB":
            img = _to_rgb(img)
            conversions.append("mode_converted")
    except Image.DecompressionBombError as e:
        raise DecodeError("too_large", str(e)) from None
    except Exception as e:
        raise DecodeError("corrupt_image", f"{type(e).__name__}: {e}") from None
    if min(img.size) < min_side:
        raise DecodeError("too_small", f"{img.size[0]}x{img.size[1]} has a side < min_side={min_side}")
    return img, conversions


def open_image(path: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An upright RGB image from a file (local or gs://) through `decode_image`; one ValueError
    naming the file and the reason (empty, not an image, too large, corrupt)."""
    try:
        data = paths.read_bytes(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot use this image ({type(e).__name__}: {e})") from None
    try:
        return decode_image(data, max_pixels=max_pixels)[0]
    except DecodeError as e:
        raise ValueError(f"{path}: {e.reason.replace('_', ' ')}" + (f" ({e.detail})" if e.detail else "")) from None
