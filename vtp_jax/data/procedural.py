"""The embedded image-caption dataset: seeded, unbounded, random-access procedural scenes.

Each example is one or two flat shapes on a textured background with a caption that names
every visible attribute ("a large striped red triangle above a small blue circle on a checkered
background"), so a model can only match captions by seeing shape, colour, size, fill, layout and
background. The label is the (shape, colour) of the first object: 64 classes for zero-shot and
linear probing. Example `i` of seed `s` depends on (s, i) only, so any worker can render any
index, at any resolution, without coordination.
"""
from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon")
COLORS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "cyan": (40, 200, 210), "blue": (40, 70, 220), "purple": (140, 50, 190), "pink": (245, 120, 190),
}
COLOR_NAMES = tuple(COLORS)
FILLS = ("solid", "striped")
BACKGROUNDS = ("plain", "striped", "checkered", "dotted", "gradient", "noisy")
SIZES = {"small": 0.12, "large": 0.21}  # object radius as a fraction of the image side
RELATIONS = ("above", "below", "left of", "right of")
CLASS_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLOR_NAMES)
_SUPERSAMPLE = 2  # render at 2x and box-filter, so edges look the same at every resolution


def label_of(shape: str, color: str) -> int:
    return SHAPES.index(shape) * len(COLOR_NAMES) + COLOR_NAMES.index(color)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Inside-test of a shape of radius r centred at the origin (dy grows downwards)."""
    ax, ay = np.abs(dx), np.abs(dy)
    rho = np.hypot(dx, dy)
    if shape == "circle":
        return rho <= r
    if shape == "square":
        return np.maximum(ax, ay) <= 0.85 * r
    if shape == "triangle":  # apex up, centroid at the origin
        return (dy >= -r) & (dy <= r / 2) & (ax <= (dy + r) / np.sqrt(3))
    if shape == "diamond":
        return ax + ay <= r
    if shape == "star":  # five points: radius swings linearly between 0.45 r and r with the angle
        phase = (np.arctan2(dx, -dy) * 5 / (2 * np.pi)) % 1.0
        return rho <= r * (0.45 + 0.55 * np.abs(1 - 2 * phase))
    if shape == "cross":
        arm = r / 3
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    if shape == "ring":
        return (rho <= r) & (rho >= 0.55 * r)
    if shape == "hexagon":
        return (ay <= r * np.sqrt(3) / 2) & (np.sqrt(3) * ax + ay <= np.sqrt(3) * r)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _background(kind: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey-scale (neutral) textures, so that no background colour competes with object colours."""
    light, dark = rng.uniform(0.75, 0.92), rng.uniform(0.35, 0.6)
    period = rng.uniform(0.08, 0.16)
    if kind == "plain":
        v = np.full_like(x, light)
    elif kind == "striped":
        t = (x * np.cos(rng.uniform(0, np.pi)) + y * np.sin(rng.uniform(0, np.pi))) / period
        v = np.where(np.floor(t) % 2 == 0, light, dark)
    elif kind == "checkered":
        v = np.where((np.floor(x / period) + np.floor(y / period)) % 2 == 0, light, dark)
    elif kind == "dotted":
        cx, cy = (x / period) % 1 - 0.5, (y / period) % 1 - 0.5
        v = np.where(np.hypot(cx, cy) < 0.25, dark, light)
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        t = np.clip(0.5 + (x - 0.5) * np.cos(theta) + (y - 0.5) * np.sin(theta), 0, 1)
        v = dark + (light - dark) * t
    elif kind == "noisy":
        cells = max(4, int(round(1 / period)))
        grid = rng.uniform(dark, light, (cells, cells))
        v = grid[np.minimum((y * cells).astype(int), cells - 1), np.minimum((x * cells).astype(int), cells - 1)]
    else:
        raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")
    return np.repeat(v[..., None].astype(np.float32) * 255, 3, axis=-1)


def _layout(rng: np.random.Generator, sizes: list[str], relation: str | None) -> list[tuple[float, float]]:
    """Object centres (x, y) in [0, 1]^2 that keep every object inside the image and make the
    relation true: centres are more than the two radii apart along the relation's axis (the
    largest pair, 2 x 0.21 + gap 0.06 + both margins, still fits in the unit side)."""
    radii = [SIZES[s] for s in sizes]
    if relation is None:
        r = radii[0]
        return [(rng.uniform(r, 1 - r), rng.uniform(r, 1 - r))]
    order = (0, 1) if relation in ("above", "left of") else (1, 0)  # which object has the smaller coordinate
    r_first, r_second = radii[order[0]], radii[order[1]]
    span = r_first + r_second + rng.uniform(0.02, 0.06)
    along = [0.0, 0.0]
    along[order[0]] = rng.uniform(r_first, 1 - r_second - span)
    along[order[1]] = along[order[0]] + span
    across = [rng.uniform(r, 1 - r) for r in radii]
    if relation in ("above", "below"):
        return [(across[i], along[i]) for i in range(2)]
    return [(along[i], across[i]) for i in range(2)]


def render_example(seed: int, index: int, size: int = 64, max_objects: int = 2,
                   sizes: tuple[str, ...] = tuple(SIZES)) -> dict:
    """Example `index` of the stream `seed`: {'image': (size, size, 3) uint8, 'caption', 'label'}.

    With max_objects=1 every scene has one object, so the label names the only object (with two,
    which one comes first is in the caption, not in the image); the random stream is the same.
    `sizes` restricts the object sizes drawn (("large",): shapes a 64 px tokenizer can keep)."""
    if size < 8:
        raise ValueError(f"procedural images need size >= 8 pixels, got {size}")
    if index < 0 or seed < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed} index={index}")
    rng = np.random.default_rng([seed, index])
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")
    if not sizes or any(s not in SIZES for s in sizes):
        raise ValueError(f"object sizes {tuple(sizes)}: expected some of {tuple(SIZES)}")
    n = 1 + int(rng.random() < 0.5 and max_objects == 2)
    objects = [dict(shape=SHAPES[rng.integers(len(SHAPES))], color=COLOR_NAMES[rng.integers(len(COLOR_NAMES))],
                    size=tuple(sizes)[rng.integers(len(sizes))], fill=FILLS[rng.integers(len(FILLS))])
               for _ in range(n)]
    relation = RELATIONS[rng.integers(len(RELATIONS))] if n == 2 else None
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]

    side = size * _SUPERSAMPLE
    coords = ((np.arange(side) + 0.5) / side).astype(np.float32)
    x, y = np.meshgrid(coords, coords)
    canvas = _background(background, x, y, rng)
    for obj, (cx, cy) in zip(objects, _layout(rng, [o["size"] for o in objects], relation)):
        r = SIZES[obj["size"]]
        inside = _shape_mask(obj["shape"], x - cx, y - cy, r)
        color = np.array(COLORS[obj["color"]], np.float32)
        if obj["fill"] == "striped":  # diagonal stripes of the colour and a darker shade of it
            stripe = np.floor((x + y) / (r / 2)) % 2 == 0
            paint = np.where(stripe[..., None], color, color * np.float32(0.55))
        else:
            paint = np.broadcast_to(color, canvas.shape)
        canvas = np.where(inside[..., None], paint, canvas)
    image = canvas.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))

    def phrase(o):
        fill = "striped " if o["fill"] == "striped" else ""
        return f"a {o['size']} {fill}{o['color']} {o['shape']}"

    caption = phrase(objects[0])
    if relation is not None:
        caption += f" {relation} {phrase(objects[1])}"
    caption += f" on a {background} background"
    return {"image": np.round(image).astype(np.uint8), "caption": caption,
            "label": label_of(objects[0]["shape"], objects[0]["color"])}
