"""Entry point: `python -m vtp_jax.main --config=configs/demo.py --workdir=DIR`.

For now the job initialises the configured model and writes reconstructions of generated images
(the pre-training loop lands with the trainer); it proves the install end to end.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from vtp_jax import config as config_lib
from vtp_jax.models.vtp import VTP, init_params
from vtp_jax.reconstruct import denormalize, normalize

config_flags.DEFINE_config_file("config", None, "configs/*.py file", lock_config=True)
flags.DEFINE_string("workdir", None, "where logs, images and checkpoints go")
FLAGS = flags.FLAGS


def _images(n, size, seed):
    """Coloured rectangles on gradients: enough structure to look at."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = np.stack([yy, xx, 1 - yy], -1) * rng.uniform(0.3, 1, 3)
        y0, x0 = rng.integers(0, size // 2, 2)
        img[y0:y0 + size // 3, x0:x0 + size // 3] = rng.uniform(0, 1, 3)
        out[i] = (img * 255).astype(np.uint8)
    return out


def main(argv):
    del argv
    config = FLAGS.config
    config_lib.check_fields(config, config_lib.default_config())
    os.makedirs(FLAGS.workdir, exist_ok=True)
    size = 8 * config.model.patch_size
    params = init_params(config.model, jax.random.key(config.seed), size)
    images = _images(4, size, config.seed)
    recon = jax.jit(lambda p, x: VTP(config.model).apply({"params": p}, x, method=lambda m, x: m.decode(m.encode(x))))(
        params, normalize(images))
    grid = np.concatenate([np.concatenate([a, denormalize(b)], 1) for a, b in zip(images, recon)], 0)
    path = os.path.join(FLAGS.workdir, "reconstructions.png")
    Image.fromarray(grid).save(path)
    n = sum(x.size for x in jax.tree.leaves(params))
    logging.info("model with %.2fM parameters; reconstructions (untrained) written to %s", n / 1e6, path)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
