"""LightningDiT (Yao et al., 2025): the class-conditional latent flow transformer VTP trains on
its latents to measure generation quality (gFID).

A DiT with adaLN-Zero conditioning, RMSNorm, SwiGLU and 2-D RoPE (EVA's interleaved pairs), built
from the project's one Attention / Mlp / norm family. Latents are NHWC (B, H, W, C); the model
predicts the rectified-flow velocity at time t in [0, 1] (t = 0 noise, t = 1 data). Parameter
names mirror the official module names so that `vtp_jax.checkpoints.lightningdit` reads like a
dictionary.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vtp_jax.models.layers import Attention, Mlp, apply_blocks, interleaved_rope_tables, norm_layer, param_with_axes

# (depth, width, heads) of the official model names; head counts are not stored in checkpoints.
# 'tiny' is for tests; 'mini' is the smallest that draws the requested object in the CPU study
# (benchmarks/RESULTS.md, "The study's DiT recipe").
DIT_SIZES = {"tiny": (2, 64, 2), "mini": (4, 192, 3), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

NORM_EPS = 1e-6  # LightningDiT's RMSNorm (blocks, final layer and q/k norms)
FREQ_DIM = 256  # sinusoidal timestep features


def swiglu_hidden(width: int, mlp_ratio: float = 4.0) -> int:
    """LightningDiT's SwiGLU width int(2/3 * int(ratio * D)) (no rounding): 2048 / 2730 / 3072."""
    return int(2 / 3 * int(width * mlp_ratio))


@functools.lru_cache(maxsize=16)
def sincos_pos_embed(h: int, w: int, width: int) -> np.ndarray:
    """The frozen (h*w, width) float32 2-D sin-cos table (MAE / DiT): the first half of the
    features encodes the column, the second the row; each half is [sin, cos] at frequencies
    10000^(-i / (width/4)). Built in float64 on the host as the reference does, then rounded."""
    if width % 4:
        raise ValueError(f"2-D sin-cos embedding needs width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))

    def one_axis(pos):
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


def timestep_embedding(t, dim: int = FREQ_DIM, max_period: float = 10000.0):
    """(B,) times (fractional, here flow times in [0, 1]) -> (B, dim) [cos, sin] features at
    frequencies max_period^(-i / (dim/2)) (GLIDE / DiT)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def _linear(features, axes, init, dtype, name):
    """A Linear with the official initializer (not `layers.dense`'s truncated normal) and
    logical axes on kernel and bias."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=param_with_axes(init, axes),
                    bias_init=param_with_axes(nn.initializers.zeros, axes[-1:]), name=name)


class TimestepEmbedder(nn.Module):
    """t -> Linear(256, D) - SiLU - Linear(D, D), weights N(0, 0.02)."""

    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t):
        normal = nn.initializers.normal(0.02)
        h = _linear(self.width, (None, "embed"), normal, self.dtype, "fc1")(timestep_embedding(t).astype(self.dtype))
        return _linear(self.width, ("mlp", "embed"), normal, self.dtype, "fc2")(nn.silu(h))


class DiTBlock(nn.Module):
    """x += gate_msa * attn(modulate(norm1 x)); x += gate_mlp * mlp(modulate(norm2 x)), with the
    six (B, D) modulations from SiLU - Linear(c) (zero-initialized: the block starts as the
    identity)."""

    num_heads: int
    mlp_hidden: int
    qk_norm: bool = False
    attention: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c, rope):
        width = x.shape[-1]
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        mod = _linear(6 * width, ("embed", "mlp"), nn.initializers.zeros, self.dtype, "adaLN_modulation")(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod[:, None], 6, axis=-1)
        attn = Attention(self.num_heads, self.qk_norm, rope_bf16=False, implementation=self.attention,
                         dtype=self.dtype, rope_pairing="interleaved", qk_norm_eps=NORM_EPS, name="attn")
        mlp = Mlp(self.mlp_hidden, "swiglu", dtype=self.dtype, name="mlp")
        h = norm_layer("rmsnorm", NORM_EPS, "norm1", self.dtype)(x)
        x = x + gate_msa * attn(modulate(h, shift_msa, scale_msa), rope)
        h = norm_layer("rmsnorm", NORM_EPS, "norm2", self.dtype)(x)
        return x + gate_mlp * mlp(modulate(h, shift_mlp, scale_mlp))


def _block_class(remat: str):
    if remat == "none":
        return DiTBlock
    if remat == "full":
        return nn.remat(DiTBlock)
    if remat == "dots":
        return nn.remat(DiTBlock, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"unknown remat policy {remat!r}: expected 'none', 'full' or 'dots'")


class LightningDiT(nn.Module):
    """Velocity model v(x_t, t, y): (B, H, W, C) latents, (B,) times, (B,) int labels ->
    (B, H, W, C) (2C with learn_sigma, velocity first). Label `num_classes` is the null class.

    The grid comes from the latents: 16 x 16 for 256 px images, 32 x 32 for 512 px (f16 tokenizers).
    No parameter depends on it (the sin-cos and RoPE tables are computed for the input's grid), so
    `input_size` only sets the shape `init` traces and the official checkpoint's buffers; the
    official model is fixed to it, this one takes any H x W multiple of patch_size.
    """

    input_size: int = 16
    patch_size: int = 1
    in_channels: int = 64
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    qk_norm: bool = False
    use_rope: bool = True
    learn_sigma: bool = False
    remat: str = "none"
    attention: str | None = None  # jax.nn.dot_product_attention implementation
    dtype: Any = jnp.float32
    scan_layers: bool = False  # one nn.scan over the blocks, params stacked as blocks/... (layers.apply_blocks)

    @nn.compact
    def __call__(self, x, t, y, train: bool = False, force_drop_ids=None):
        """`train` drops labels to the null class with class_dropout_prob (rng 'label_dropout');
        `force_drop_ids` (B,) drops exactly where it is 1, in or out of training (as the official)."""
        b, height, width, channels = x.shape
        p, d = self.patch_size, self.hidden_size
        if channels != self.in_channels or height % p or width % p:
            raise ValueError(f"LightningDiT takes (B, H, W, {self.in_channels}) latents with H and W multiples of "
                             f"patch_size {p}, got {x.shape}")
        gh, gw = height // p, width // p
        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
                    # the official initializes the conv as a Linear over its flattened (p, p, C) inputs
                    kernel_init=param_with_axes(nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1),
                                                (None, None, None, "embed")),
                    bias_init=param_with_axes(nn.initializers.zeros, ("embed",)),
                    name="x_embedder")(x.astype(self.dtype))
        x = x.reshape(b, gh * gw, d) + jnp.asarray(sincos_pos_embed(gh, gw, d), self.dtype)

        labels = jnp.asarray(y, jnp.int32)
        if train and self.class_dropout_prob > 0 and force_drop_ids is None:
            drop = jax.random.uniform(self.make_rng("label_dropout"), (b,)) < self.class_dropout_prob
            labels = jnp.where(drop, self.num_classes, labels)
        if force_drop_ids is not None:
            labels = jnp.where(jnp.asarray(force_drop_ids) == 1, self.num_classes, labels)
        y_emb = nn.Embed(self.num_classes + 1, d, dtype=self.dtype, param_dtype=jnp.float32,
                         embedding_init=param_with_axes(nn.initializers.normal(0.02), ("vocab", "embed")),
                         name="y_embedder")(labels)
        c = TimestepEmbedder(d, self.dtype, name="t_embedder")(t) + y_emb

        rope = interleaved_rope_tables(gh, gw, d // self.num_heads) if self.use_rope else None
        block = _block_class(self.remat)
        hidden = swiglu_hidden(d, self.mlp_ratio)

        def make(name):
            return block(num_heads=self.num_heads, mlp_hidden=hidden, qk_norm=self.qk_norm, attention=self.attention,
                         dtype=self.dtype, name=name)

        x, _ = apply_blocks(make, self.depth, x, c, rope, scan=self.scan_layers)
        return FinalLayer(p, self.in_channels * (2 if self.learn_sigma else 1), self.dtype,
                          name="final_layer")(x, c, (gh, gw))


class FinalLayer(nn.Module):
    """norm, adaLN (shift, scale), Linear(D, p*p*C), unpatchify channel-fastest; all zero-init."""

    patch_size: int
    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c, grid=None):
        """`grid` (h, w) of the tokens; None: a square one."""
        b, tokens, width = x.shape
        p = self.patch_size
        gh, gw = grid if grid is not None else (math.isqrt(tokens),) * 2
        zeros = nn.initializers.zeros
        mod = _linear(2 * width, ("embed", "mlp"), zeros, self.dtype, "adaLN_modulation")(nn.silu(c))
        shift, scale = jnp.split(mod[:, None], 2, axis=-1)
        x = modulate(norm_layer("rmsnorm", NORM_EPS, "norm_final", self.dtype)(x), shift, scale)
        x = _linear(p * p * self.out_channels, ("embed", None), zeros, self.dtype, "linear")(x)
        return einops.rearrange(x, "b (h w) (p q c) -> b (h p) (w q) c", h=gh, w=gw, p=p, q=p).astype(jnp.float32)


def official_init(params, rng):
    """Re-draws the block Linears that layers.Attention / layers.Mlp create with a truncated
    normal as the official does: xavier-uniform over each fused torch matrix (qkv as one
    (D, 3D) matrix, SwiGLU's w1 and w2 as one (D, 2H) `w12`). Works on boxed or unboxed params,
    and on block stacks with leading axes (fans are read from the trailing dims)."""
    def fans(names, shape):
        if names[-2:] == ("qkv", "kernel"):  # (..., D, 3, H, dh)
            return shape[-4], int(np.prod(shape[-3:]))
        if names[-2:] == ("proj", "kernel"):  # (..., H, dh, D)
            return int(np.prod(shape[-3:-1])), shape[-1]
        if names[-2:] in (("w1", "kernel"), ("w2", "kernel")):  # halves of w12
            return shape[-2], 2 * shape[-1]
        if names[-2:] == ("w3", "kernel"):
            return shape[-2], shape[-1]
        return None

    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(rng, len(leaves))
    out = []
    for key, (path, leaf) in zip(keys, leaves):
        names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        names = tuple(n for n in names if n != "value")  # nn.Partitioned boxes
        f = fans(names, leaf.shape) if any(n in ("attn", "mlp") for n in names) else None
        if f is not None:
            bound = math.sqrt(6.0 / sum(f))
            leaf = jax.random.uniform(key, leaf.shape, leaf.dtype, -bound, bound)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnums=0)
def init_params(model: LightningDiT, rng):
    """Unboxed float32 params of `model`, initialized as the official LightningDiT."""
    init_rng, xavier_rng = jax.random.split(rng)
    x = jnp.zeros((1, model.input_size, model.input_size, model.in_channels), jnp.float32)
    params = model.init(init_rng, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
    return official_init(nn.meta.unbox(params), xavier_rng)


def param_shapes(model: LightningDiT):
    """Parameter ShapeDtypeStructs without allocating."""
    return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
