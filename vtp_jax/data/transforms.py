"""Image transforms: the CLIP / DINOv2 / reconstruction views and iBOT masks (decoding, checked,
is `vtp_jax.images.decode_image`).

Everything random takes an explicit `np.random.Generator`, so a view is a pure function of
(image, generator state): the pipeline seeds generators from (seed, record position) and a
restarted run recomputes exactly the same crops. Geometry follows torchvision's
RandomResizedCrop; photometric ops use PIL's C kernels (the torchvision PIL backend does the same).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

def random_resized_crop_box(rng: np.random.Generator, width: int, height: int, scale: Sequence[float],
                            ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, w, h) of torchvision's RandomResizedCrop: 10 tries of a random area fraction
    and log-uniform aspect ratio, then a centre crop clamped to the ratio range."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(img: Image.Image, rng: np.random.Generator, size: int, scale: Sequence[float],
                        flip_probability: float = 0.0) -> Image.Image:
    """Crop + bicubic resize in one PIL call (antialiased, as torchvision's PIL path)."""
    left, top, w, h = random_resized_crop_box(rng, *img.size, scale)
    out = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    if rng.random() < flip_probability:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out


def adjust_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotate hue by `shift` turns (in [-0.5, 0.5]) in PIL's 8-bit HSV, as torchvision's PIL path."""
    h, s, v = img.convert("HSV").split()
    h = Image.fromarray((np.asarray(h, np.int16) + int(round(shift * 255))).astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def color_jitter(img: Image.Image, rng: np.random.Generator, brightness: float, contrast: float,
                 saturation: float, hue: float) -> Image.Image:
    """torchvision ColorJitter: factors 1 +- strength (hue +- hue), applied in a random order."""
    ops = [
        lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(1 - brightness, 1 + brightness)),
        lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(1 - contrast, 1 + contrast)),
        lambda im: ImageEnhance.Color(im).enhance(rng.uniform(1 - saturation, 1 + saturation)),
        lambda im: adjust_hue(im, rng.uniform(-hue, hue)),
    ]
    for i in rng.permutation(len(ops)):
        img = ops[i](img)
    return img


def grayscale(img: Image.Image) -> Image.Image:
    """ITU-R 601 luma replicated to 3 channels (PIL 'L' conversion, torchvision's Grayscale)."""
    return img.convert("L").convert("RGB")


def solarize(img: Image.Image, threshold: int = 128) -> Image.Image:
    return ImageOps.solarize(img, threshold)


def gaussian_blur(img: Image.Image, rng: np.random.Generator, sigma: Sequence[float]) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(sigma[0], sigma[1])))


def dino_view(img: Image.Image, rng: np.random.Generator, *, size: int, scale: Sequence[float], c,
              blur_probability: float, solarize_probability: float = 0.0) -> np.ndarray:
    """One DINOv2 crop: resized crop + flip, jitter with p, grayscale with p, blur with p,
    solarize with p; `c` carries the strengths (config.data)."""
    out = random_resized_crop(img, rng, size, scale, c.flip_probability)
    if rng.random() < c.color_jitter_probability:
        out = color_jitter(out, rng, *c.color_jitter)
    if rng.random() < c.grayscale_probability:
        out = grayscale(out)
    if rng.random() < blur_probability:
        out = gaussian_blur(out, rng, c.blur_sigma)
    if rng.random() < solarize_probability:
        out = solarize(out)
    return np.asarray(out)


def multi_crop(img: Image.Image, rng: np.random.Generator, c) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """DINOv2's DataAugmentationDINO on one image: 2 global crops (blur p1 on the first; blur p2
    and solarize on the second) and `local_crops_number` local crops, as uint8 arrays."""
    g1, g2 = c.global_blur_probability
    globals_ = [
        dino_view(img, rng, size=c.global_crops_size, scale=c.global_crops_scale, c=c, blur_probability=g1),
        dino_view(img, rng, size=c.global_crops_size, scale=c.global_crops_scale, c=c, blur_probability=g2,
                  solarize_probability=c.solarize_probability),
    ]
    locals_ = [dino_view(img, rng, size=c.local_crops_size, scale=c.local_crops_scale, c=c,
                         blur_probability=c.local_blur_probability) for _ in range(c.local_crops_number)]
    return globals_, locals_


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM's center_crop_arr: halve with a box filter while the short side >= 2 * size, bicubic
    resize of the short side to `size`, then the central size x size square. Used for the
    reconstruction view and ImageNet evaluation (rFID is reported on exactly this crop)."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def squash_resize(img: Image.Image, size: int) -> Image.Image:
    """Both sides to `size` ignoring aspect (VTP's zero-shot evaluation preprocessing)."""
    return img.resize((size, size), Image.BICUBIC)


def block_mask(rng: np.random.Generator, grid: tuple[int, int], num_masking_patches: int, *,
               min_num_patches: int = 4, max_num_patches: int | None = None, min_aspect: float = 0.3,
               max_aspect: float | None = None) -> np.ndarray:
    """DINOv2's MaskingGenerator: add random rectangles (area in [min, remaining], log-uniform
    aspect) until `num_masking_patches` are masked or 10 tries in a row add nothing; then, as
    DINOv3's generator does, top up with random single patches so the count is exact."""
    height, width = grid
    if not 0 <= num_masking_patches <= height * width:
        raise ValueError(f"num_masking_patches={num_masking_patches} outside [0, {height * width}] for grid {grid}")
    max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
    log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
    mask = np.zeros(grid, bool)
    count = 0
    while count < num_masking_patches:
        budget = min(num_masking_patches - count, max_num_patches)
        added = 0
        for _ in range(10):
            target = min_num_patches + (budget - min_num_patches) * rng.random()  # also when budget < min
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < width and h < height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block[...] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
    if count < num_masking_patches:
        flat = mask.reshape(-1)
        flat[rng.choice(np.flatnonzero(~flat), num_masking_patches - count, replace=False)] = True
    return mask


def ibot_masks(rng: np.random.Generator, n: int, grid: tuple[int, int], ratio_min_max: Sequence[float],
               probability: float) -> np.ndarray:
    """(n, *grid) bool masks for n global crops, as DINOv2's collate: int(n * probability) crops
    are masked, their ratios spread evenly over [min, max] (one uniform draw per linspace bin),
    the rest unmasked, and the list shuffled. Block size is capped at half the grid."""
    num_patches = grid[0] * grid[1]
    n_masked = int(n * probability)
    edges = np.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1)
    counts = [int(num_patches * rng.uniform(edges[i], edges[i + 1])) for i in range(n_masked)]
    counts += [0] * (n - n_masked)
    masks = np.stack([block_mask(rng, grid, k, max_num_patches=int(0.5 * num_patches)) for k in counts]) \
        if n else np.zeros((0, *grid), bool)
    return masks[rng.permutation(n)]
