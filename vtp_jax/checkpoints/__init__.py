"""Weight import: released VTP checkpoints and torch-layout weight files.

The two checks every converted weight file (LPIPS VGG16, FID Inception) goes through live here,
so each model module only states its expected shapes and its name."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from vtp_jax import paths


def check_shapes(params, want: dict, source: str, what: str) -> None:
    """One ValueError listing every missing, unexpected or mis-shaped parameter of `params`
    against `want` ({'a/b/kernel': shape}: the model module's `param_shapes()`)."""
    got = traverse_util.flatten_dict(params, sep="/") if isinstance(params, dict) else {}
    problems = [f"missing {k} {want[k]}" for k in want if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in want]
    problems += [f"{k}: shape {tuple(np.shape(got[k]))}, expected {want[k]}"
                 for k in want if k in got and tuple(np.shape(got[k])) != want[k]]
    if problems:
        raise ValueError(f"{source}: not {what} params: " + "; ".join(problems))


def load_converted(path: str, want: dict, what: str, how_to: str):
    """A converted Flax msgpack weight file as a float32 pytree, checked against the shapes `want`;
    a missing or unreadable file is one error that says how to make it (`how_to`)."""
    if not path or not paths.isfile(path):
        raise FileNotFoundError(f"{what} weights file {path!r} does not exist. {how_to}")
    blob = paths.read_bytes(path)
    try:
        params = serialization.msgpack_restore(blob)
    except Exception as e:  # msgpack raises several unrelated types on garbage.
        raise ValueError(f"{path}: not a Flax msgpack params file ({type(e).__name__}: {e}). {how_to}") from e
    check_shapes(params, want, path, what)
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
