"""`load_pretrained`: a released VTP folder (or hub id) as jitted JAX functions.

Shapes: images (B, H, W, 3) float32 ImageNet-normalized with H, W multiples of the patch size
(`vtp_jax.load_images` makes them from files; `vtp_jax.to_pixels` turns decoded images back into
uint8); latents (B, H/p, W/p, latent_dim). Each method is jitted once per input shape (jax.jit's
cache). Outputs are float32 whatever the compute dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vtp_jax.checkpoints import released
from vtp_jax.data import tokenizer as tokenizer_lib
from vtp_jax.models.vtp import VTP


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Model config + params (float32, or bfloat16 for bf16 inference); methods mirror the
    release's public API in NHWC."""

    config: ml_collections.ConfigDict
    params: Any
    _fns: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def _apply(self, method: str, x, layers: tuple = ()):
        key = (method, layers)
        if key not in self._fns:
            self._fns[key] = _jitted(VTP(self.config), method, layers)
        return self._fns[key](self.params, x)

    def encode(self, images) -> jax.Array:
        return self._apply("encode", jnp.asarray(images, jnp.float32))

    def decode(self, latents) -> jax.Array:
        return self._apply("decode", jnp.asarray(latents, jnp.float32))

    def features(self, images, layers: Sequence[int] = ()) -> dict:
        """Trunk features: normed cls, registers, patches (B, h, w, D) and normed `layers` outputs."""
        return self._apply("encode_features", jnp.asarray(images, jnp.float32), layers=tuple(layers))

    def image_features(self, images) -> jax.Array:
        return self._apply("image_features", jnp.asarray(images, jnp.float32))

    def text_features(self, token_ids) -> jax.Array:
        return self._apply("clip_text", jnp.asarray(token_ids, jnp.int32))

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return tokenizer_lib.tokenize(texts, self.config.text.context_length)


def _jitted(model: VTP, method: str, layers: tuple):
    def fn(params, x):
        def call(m, x):
            if method == "image_features":
                return m.clip_image(m.encode_features(x))
            if method == "encode_features":
                return m.encode_features(x, return_layers=layers)
            return getattr(m, method)(x)
        out = model.apply({"params": params}, x, method=call)
        return jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, out)

    return jax.jit(fn)


def load_pretrained(folder: str, dtype=jnp.float32, allow_nonfinite: bool = False) -> Pretrained:
    """A released VTP folder (config.json + model.safetensors, float32 or bfloat16), local, gs://
    or a Hugging Face hub id ("MiniMaxAI/VTP-Large-f16d64"). `dtype=jnp.bfloat16` computes (and
    holds the weights) in bfloat16, for accelerators' bf16 units and half the memory: latents within
    0.7% (relative L2) of float32's on the demo tokenizer (benchmarks/RESULTS.md). Weights with
    NaN or inf raise a CheckpointError naming them unless `allow_nonfinite`."""
    config, params = released.load_release(folder, allow_nonfinite=allow_nonfinite)
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"dtype={dtype}: expected float32 or bfloat16")
    config.dtype = dtype.name
    return Pretrained(config, jax.device_put(jax.tree.map(lambda p: jnp.asarray(p, dtype), params)))
