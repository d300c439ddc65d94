"""Reconstruct images with a released VTP checkpoint and print PSNR per image.

  python -m vtp_jax.reconstruct --checkpoint MiniMaxAI/VTP-Base-f16d64 --images a.jpg b.png --out OUT/

Each image is resized so its shorter side is --size and centre-cropped to a multiple of the patch
size (or kept whole with --size 0, cropped only to that multiple); OUT/<name>.png holds the input
and its reconstruction side by side.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image

import vtp_jax
from vtp_jax.checkpoints.released import CheckpointError
from vtp_jax.images import normalize, open_image, to_uint8


def load_image(path: str, size: int, multiple: int) -> np.ndarray:
    """uint8 (H, W, 3); shorter side -> size (if size), centre crop to a multiple of `multiple`.
    Decoded by `images.open_image`: an empty, truncated or unidentifiable file, or one whose header
    claims more than PIL's pixel limit (a small file claiming 60000 x 60000 pixels would otherwise
    take ~10 GB), is one ValueError naming the file, before any pixel is decoded."""
    im = open_image(path)
    if size:
        scale = size / min(im.size)
        im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))),
                       Image.Resampling.BICUBIC)
    w, h = im.width // multiple * multiple, im.height // multiple * multiple
    if not w or not h:
        raise ValueError(f"{path}: {im.width}x{im.height} is smaller than one {multiple}px patch")
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return np.asarray(im.crop((left, top, left + w, top + h)))


def psnr(a_u8: np.ndarray, b_u8: np.ndarray) -> float:
    mse = np.mean((a_u8.astype(np.float64) - b_u8.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def expand_images(paths) -> tuple[list[str], list[str]]:
    """(image files, errors): folders are replaced by the images in them (sorted)."""
    files, errors = [], []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                errors.append(f"{p}: a folder without images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif not os.path.exists(p):
            errors.append(f"{p}: no such file")
        else:
            files.append(p)
    return files, errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="released VTP folder (config.json + model.safetensors)")
    ap.add_argument("--images", nargs="+", required=True, help="image files or folders of images")
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=256, help="shorter side before the centre crop; 0 keeps the size")
    args = ap.parse_args(argv)
    try:
        model = vtp_jax.load_pretrained(args.checkpoint)
    except (FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files, errors = expand_images(args.images)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    for path in files:
        try:
            image = load_image(path, args.size, model.config.patch_size)
        except ValueError as e:  # one line naming the file: empty, truncated, not an image, too large, too small
            print(f"error: {e}", file=sys.stderr)
            errors.append(path)
            continue
        recon = to_uint8(model.decode(model.encode(normalize(image)[None]))[0])
        name = os.path.splitext(os.path.basename(path))[0]
        Image.fromarray(np.concatenate([image, recon], axis=1)).save(os.path.join(args.out, f"{name}.png"))
        print(f"{path}: {image.shape[1]}x{image.shape[0]} PSNR {psnr(image, recon):.2f} dB")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
