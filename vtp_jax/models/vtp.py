"""The VTP model: vision trunk, 64-d bottleneck, pixel decoder, text tower, CLIP and DINO heads.

Images are NHWC and ImageNet-normalized; latents are (B, H/p, W/p, latent_dim). Parameter names
follow the release (trunk / feature_bottleneck / pixel_decoder / text / visual_proj) so that the
importer in `vtp_jax.checkpoints.released` reads like a dictionary.
"""
from __future__ import annotations

from typing import Any, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vtp_jax.models.heads import DINOHead
from vtp_jax.models.layers import (apply_blocks, dense, l2_normalize, mlp_hidden, norm_layer, param_with_axes,
                                   remat_block, rope_tables)


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class RopeTransformer(nn.Module):
    """What the trunk and the pixel decoder share: the same Block stack over an h x w token
    grid with axial RoPE (prefix tokens, if any, lead the sequence and are not rotated).
    With `scan_layers` the stack is one nn.scan (see layers.apply_blocks)."""

    width: int
    depth: int
    num_heads: int
    patch_size: int = 16
    mlp: str = "swiglu"
    mlp_ratio: float = 4.0
    norm: str = "rmsnorm"
    qk_norm: bool = False
    layerscale: float | None = None
    rope_base: float = 100.0
    rope_bf16: bool = True
    remat: str = "none"
    attention: str = "xla"
    dtype: Any = jnp.float32
    scan_layers: bool = False

    def blocks(self, x, h: int, w: int, drop_rate: float, keep=()):
        """x after the depth blocks, and the outputs of the blocks in `keep` (in block order)."""
        rope = rope_tables(h, w, self.width // self.num_heads, self.rope_base, self.rope_bf16)
        block = remat_block(self.remat)
        hidden = mlp_hidden(self.mlp, self.width, self.mlp_ratio)

        def make(name):
            return block(num_heads=self.num_heads, mlp_hidden=hidden, mlp=self.mlp, norm=self.norm, norm_eps=None,
                         qk_norm=self.qk_norm, layerscale=self.layerscale, causal=False, rope_bf16=self.rope_bf16,
                         attention=self.attention, dtype=self.dtype, name=name)

        return apply_blocks(make, self.depth, x, rope, static=(drop_rate,), scan=self.scan_layers, keep=keep)


class Encoder(RopeTransformer):
    """DINOv3-style ViT trunk: conv patch embed, cls (+ registers), RoPE blocks, final norm."""

    n_registers: int = 0

    @nn.compact
    def __call__(self, images, masks=None, drop_rate: float = 0.0, return_layers: Sequence[int] = ()):
        """Returns dict(cls, registers, patches (B, h, w, D), intermediates [(B, h, w, D)],
        intermediate_cls [(B, D)]), all normed (intermediates: the blocks in `return_layers`)."""
        b, height, width, _ = images.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
        h, w = height // p, width // p
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=jnp.float32,
                    kernel_init=param_with_axes(nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                                                (None, None, None, "embed")),
                    bias_init=param_with_axes(nn.initializers.zeros, ("embed",)),
                    name="patch_embed")(images.astype(self.dtype))
        x = x.reshape(b, h * w, self.width)
        mask_token = self.param("mask_token", param_with_axes(nn.initializers.zeros, (None, "embed")),
                                (1, self.width), jnp.float32)
        if masks is not None:  # iBOT: masked patch embeddings are replaced by the mask token.
            x = jnp.where(masks.reshape(b, h * w, 1), mask_token.astype(x.dtype)[None], x)
        cls = self.param("cls_token", param_with_axes(nn.initializers.normal(0.02), (None, None, "embed")),
                         (1, 1, self.width), jnp.float32)
        prefix = [jnp.broadcast_to(cls, (b, 1, self.width))]
        if self.n_registers:
            regs = self.param("registers", param_with_axes(nn.initializers.normal(0.02), (None, None, "embed")),
                              (1, self.n_registers, self.width), jnp.float32)
            prefix.append(jnp.broadcast_to(regs, (b, self.n_registers, self.width)))
        x = jnp.concatenate([t.astype(x.dtype) for t in prefix] + [x], axis=1)

        norm = norm_layer(self.norm, name="norm", dtype=self.dtype)
        bad = [i for i in return_layers if not -self.depth <= i < self.depth]
        if bad:
            raise ValueError(f"return_layers {bad} out of range for a {self.depth}-block trunk")
        n_prefix = 1 + self.n_registers
        x, kept = self.blocks(x, h, w, drop_rate, [i % self.depth for i in return_layers])  # -1: last block
        # As the release's get_intermediate_layers(norm=True): normed patch tokens.
        kept = [norm(y) for y in kept]
        x = norm(x)
        return dict(cls=x[:, 0], registers=x[:, 1:n_prefix],
                    patches=x[:, n_prefix:].reshape(b, h, w, self.width),
                    intermediates=[y[:, n_prefix:].reshape(b, h, w, self.width) for y in kept],
                    intermediate_cls=[y[:, 0] for y in kept])


class PixelDecoder(RopeTransformer):
    """Latents (B, h, w, d) -> ImageNet-normalized pixels (B, h*p, w*p, 3) via RoPE blocks and
    pixel shuffle (channel c*p*p + i*p + j goes to pixel (p*y + i, p*x + j), colour c)."""

    norm: str = "layernorm"

    @nn.compact
    def __call__(self, latents, drop_rate: float = 0.0):
        b, h, w, _ = latents.shape
        p = self.patch_size
        x = dense(self.width, (None, "embed"), std=latents.shape[-1] ** -0.5, dtype=self.dtype,
                  name="proj_in")(latents.astype(self.dtype))
        x = x.reshape(b, h * w, self.width)
        x, _ = self.blocks(x, h, w, drop_rate)
        x = norm_layer(self.norm, name="norm", dtype=self.dtype)(x)
        x = dense(3 * p * p, ("embed", None), std=self.width ** -0.5, dtype=self.dtype, name="proj_out")(x)
        x = x.reshape(b, h, w, 3 * p * p)
        return einops.rearrange(x, "b h w (c i j) -> b (h i) (w j) c", i=p, j=p).astype(jnp.float32)


class TextTower(nn.Module):
    """OpenCLIP text transformer: token + learned positions, causal blocks, final LayerNorm,
    pooled at the EOT token (the argmax of the ids), projected by a bare matrix."""

    width: int
    depth: int
    num_heads: int
    out_dim: int
    mlp_ratio: float = 4.0
    vocab_size: int = 49408
    context_length: int = 77
    init_logit_scale: float = 2.659260036932778
    remat: str = "none"
    attention: str = "xla"
    dtype: Any = jnp.float32
    scan_layers: bool = False

    @nn.compact
    def __call__(self, tokens):
        b, n = tokens.shape
        if n > self.context_length:
            raise ValueError(f"token ids have length {n} > context_length {self.context_length}")
        emb = self.param("token_embedding", param_with_axes(nn.initializers.normal(0.02), ("vocab", "embed")),
                         (self.vocab_size, self.width), jnp.float32)
        pos = self.param("positional_embedding", param_with_axes(nn.initializers.normal(0.01), (None, "embed")),
                         (self.context_length, self.width), jnp.float32)
        x = (jnp.take(emb, tokens, axis=0) + pos[:n]).astype(self.dtype)
        attn_std = self.width ** -0.5  # OpenCLIP init
        stds = (attn_std, attn_std * (2 * self.depth) ** -0.5, (2 * self.width) ** -0.5, attn_std * (2 * self.depth) ** -0.5)
        block = remat_block(self.remat)

        def make(name):
            return block(num_heads=self.num_heads, mlp_hidden=int(self.width * self.mlp_ratio), mlp="gelu",
                         norm="layernorm", norm_eps=1e-5, qk_norm=False, layerscale=None, causal=True, rope_bf16=False,
                         attention=self.attention, init_stds=stds, dtype=self.dtype, name=name)

        x, _ = apply_blocks(make, self.depth, x, None, static=(0.0,), scan=self.scan_layers)
        x = norm_layer("layernorm", 1e-5, name="ln_final", dtype=self.dtype)(x)
        pooled = x[jnp.arange(b), jnp.argmax(tokens, axis=-1)]
        # CLIP's learned log temperature lives with the text tower (created here, read by the loss).
        self.param("logit_scale", param_with_axes(nn.initializers.constant(self.init_logit_scale), ()), (), jnp.float32)
        proj = self.param("text_projection", param_with_axes(nn.initializers.normal(self.width ** -0.5), ("embed", None)),
                          (self.width, self.out_dim), jnp.float32)
        return pooled.astype(jnp.float32) @ proj


class VTP(nn.Module):
    """The whole tokenizer; each method is one path the trainer or a user needs."""

    config: ml_collections.ConfigDict

    def setup(self):
        c = self.config
        dtype = _dtype(c.dtype)
        shared = dict(patch_size=c.patch_size, rope_base=c.rope_base, rope_bf16=c.rope_bf16, remat=c.remat,
                      attention=c.attention, dtype=dtype, scan_layers=c.scan_layers)
        self.trunk = Encoder(c.width, c.depth, c.num_heads, mlp=c.mlp, mlp_ratio=c.mlp_ratio, norm=c.norm,
                             qk_norm=c.qk_norm, layerscale=c.layerscale, n_registers=c.n_registers, **shared)
        # The latent's maps in and out (bottleneck, decoder proj_in / proj_out) are fan-in scaled,
        # not N(0, 0.02) as the blocks: at 0.02 a 16-64-d latent reaches the decoder ~10x weakened and
        # an autoencoder sits for hundreds of steps on grey mean images (RESULTS.md, "colour").
        self.feature_bottleneck = dense(c.latent_dim, ("embed", None), use_bias=False, std=c.width ** -0.5, dtype=dtype)
        d = c.decoder
        if d.depth:
            self.pixel_decoder = PixelDecoder(d.width, d.depth, d.num_heads, mlp=d.mlp, mlp_ratio=d.mlp_ratio,
                                              norm=d.norm, qk_norm=d.qk_norm, layerscale=d.layerscale, **shared)
        t = c.text
        if t.depth:
            self.text = TextTower(t.width, t.depth, t.num_heads, c.clip_dim, t.mlp_ratio, t.vocab_size,
                                  t.context_length, c.init_logit_scale, c.remat, c.attention, dtype, c.scan_layers)
            self.visual_proj = dense(c.clip_dim, ("embed", None), use_bias=False, dtype=dtype)
        if c.head.prototypes:
            h = c.head
            self.dino_head = DINOHead(h.prototypes, h.hidden_dim, h.bottleneck_dim, h.n_layers, h.use_bn, dtype)

    def __call__(self, images, tokens=None):
        """Touches every submodule once (for init); returns the reconstruction."""
        feats = self.encode_features(images)
        if self.config.text.depth:
            self.clip_image(feats)
            self.clip_text(tokens if tokens is not None else jnp.zeros((images.shape[0], self.config.text.context_length), jnp.int32))
        if self.config.head.prototypes:
            self.dino_head(feats["cls"])
        latents = self.bottleneck(feats["patches"])
        return self.decode(latents) if self.config.decoder.depth else latents

    def encode_features(self, images, masks=None, drop_rate=0.0, return_layers=()):
        return self.trunk(images, masks, drop_rate, tuple(return_layers))

    def bottleneck(self, patches):
        return self.feature_bottleneck(patches).astype(jnp.float32)

    def encode(self, images):
        return self.bottleneck(self.encode_features(images)["patches"])

    def decode(self, latents, drop_rate=0.0):
        return self.pixel_decoder(latents, drop_rate)

    def clip_image(self, feats, normalize=True):
        """CLIP image embedding from trunk features (the D-dim ones: the release's
        bottleneck_ae_only puts only the reconstruction path through the latent)."""
        if self.config.clip_feat == "cls":
            x = feats["cls"]
        elif self.config.clip_feat == "pooled":
            x = feats["patches"].mean(axis=(1, 2))
        else:
            raise ValueError(f"unknown clip_feat {self.config.clip_feat!r}: expected 'cls' or 'pooled'")
        x = self.visual_proj(x).astype(jnp.float32)
        return l2_normalize(x) if normalize else x

    def clip_text(self, tokens, normalize=True):
        x = self.text(tokens)
        return l2_normalize(x) if normalize else x

    def head(self, x, valid=None):
        return self.dino_head(x, valid)


def init_params(config: ml_collections.ConfigDict, rng, image_size: int | None = None):
    """Float32 parameters (unboxed) for `config`, initialised as the release initialises them."""
    size = image_size or 4 * config.patch_size
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    variables = VTP(config).init(rng, images)
    return nn.meta.unbox(variables["params"])


def param_shapes(config: ml_collections.ConfigDict):
    """Parameter ShapeDtypeStructs without allocating (the release importer checks files against
    them, the pretrain job builds its optimizer on them). Traced once per config in a process:
    the study loads each tokenizer half a dozen times. The shapes do not depend on the image size."""
    key = config.to_json_best_effort(sort_keys=True)
    if key not in _PARAM_SHAPES:
        _PARAM_SHAPES[key] = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return jax.tree.map(lambda x: x, _PARAM_SHAPES[key])  # fresh containers: callers may edit theirs


_PARAM_SHAPES: dict[str, Any] = {}
