"""The one transformer block of vtp-jax and its parts.

The same `Block` serves the vision trunk (RMSNorm, SwiGLU, RoPE on patch tokens), the pixel
decoder (LayerNorm, SwiGLU, RoPE on all tokens) and the text tower (LayerNorm, GELU, causal).
Every parameter carries logical axis names ('embed', 'mlp', 'heads', 'kv', 'vocab', 'norm') so
that the trainer shards them by rules declared once in `vtp_jax.train.sharding`.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

Dtype = Any
_BF16 = ml_dtypes.bfloat16

trunc_normal = nn.initializers.truncated_normal  # std is the std of the truncated normal's parent


def l2_normalize(x, axis=-1, eps=1e-12):
    """x / max(||x||, eps) (torch's F.normalize), with a finite gradient at x = 0 (padding rows)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def param_with_axes(init, axes):
    return nn.with_logical_partitioning(init, axes)


def dense(features, axes, *, use_bias=True, std=0.02, dtype=jnp.float32, name=None, in_shape=None):
    """Linear map with logical axes on kernel and bias; truncated-normal init as the release.

    With `in_shape` (the contracted trailing input dims) or tuple `features`, the kernel is
    multi-axis (fused qkv (D, 3, H, dh), attention out (H, dh, D)) and an Einsum, whose
    initializer sees the real kernel shape, so the logical names always match its rank.
    """
    features_t = features if isinstance(features, tuple) else (features,)
    kernel_init = param_with_axes(nn.initializers.truncated_normal(std), axes)
    bias_init = param_with_axes(nn.initializers.zeros, axes[-len(features_t):])
    if in_shape is None:
        return nn.Dense(features_t[0], use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                        kernel_init=kernel_init, bias_init=bias_init, name=name)
    ins, outs = "abcd"[:len(in_shape)], "efgh"[:len(features_t)]
    return nn.Einsum((*in_shape, *features_t), f"...{ins},{ins}{outs}->...{outs}", use_bias, dtype, jnp.float32,
                     kernel_init=kernel_init, bias_init=bias_init, name=name)


def norm_layer(kind: str, eps: float | None = None, name=None, dtype=jnp.float32):
    """RMSNorm (release: eps 1e-5) or LayerNorm (release decoder: eps 1e-6); reductions in f32."""
    if kind == "rmsnorm":
        return nn.RMSNorm(
            epsilon=1e-5 if eps is None else eps, dtype=dtype, param_dtype=jnp.float32,
            scale_init=param_with_axes(nn.initializers.ones, ("norm",)), name=name)
    if kind == "layernorm":
        return nn.LayerNorm(
            epsilon=1e-6 if eps is None else eps, dtype=dtype, param_dtype=jnp.float32,
            scale_init=param_with_axes(nn.initializers.ones, ("norm",)),
            bias_init=param_with_axes(nn.initializers.zeros, ("norm",)), name=name)
    raise ValueError(f"unknown norm {kind!r}: expected 'rmsnorm' or 'layernorm'")


def mlp_hidden(kind: str, width: int, mlp_ratio: float, align: int = 8) -> int:
    """Hidden size: int(ratio * width); the released SwiGLU takes 2/3 of it rounded up to `align`
    so that its three matrices cost what a GELU MLP's two do."""
    d = int(width * mlp_ratio)
    if kind != "swiglu":
        return d
    d = int(d * 2 / 3)
    return d + (-d % align)


# ----------------------------------------------------------------------------------------------
# Axial RoPE (DINOv3 style, as released).
# ----------------------------------------------------------------------------------------------
def _round_bf16(a):
    return np.asarray(a, np.float32).astype(_BF16).astype(np.float32)


@functools.lru_cache(maxsize=64)
def rope_tables(h: int, w: int, head_dim: int, base: float = 100.0, bf16: bool = True):
    """(sin, cos), each (h*w, head_dim) float32, for an h x w token grid.

    Coordinates are patch centres normalised per axis to [-1, 1]; angles 2*pi*coord/period for
    head_dim/4 periods per axis, concatenated (rows then columns) and tiled twice so that
    rotate-half pairs dimension i with i + head_dim/2. With `bf16` every op is rounded to
    bfloat16 in the order the released PyTorch code runs it, so tables match it bit for bit.
    Built on the host: grids are static, and this keeps XLA from fusing away the rounding.
    """
    if head_dim % 4:
        raise ValueError(f"axial RoPE needs head_dim divisible by 4, got {head_dim}")
    r = _round_bf16 if bf16 else (lambda a: np.asarray(a, np.float32))  # noqa: E731
    n_freq = head_dim // 4
    periods = r(np.float32(base) ** r(r(2 * r(np.arange(n_freq))) / np.float32(head_dim // 2)))
    coords_h = r(r(np.arange(0.5, h, dtype=np.float32)) / np.float32(h))
    coords_w = r(r(np.arange(0.5, w, dtype=np.float32)) / np.float32(w))
    coords = np.stack(np.meshgrid(coords_h, coords_w, indexing="ij"), axis=-1).reshape(h * w, 2)
    coords = r(r(np.float32(2.0) * coords) - np.float32(1.0))
    angles = r(r(coords[:, :, None] * np.float32(2 * math.pi)) / periods[None, None, :])
    angles = np.tile(angles.reshape(h * w, 2 * n_freq), (1, 2))
    return r(np.sin(angles)), r(np.cos(angles))


def _rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, sin, cos, *, bf16: bool):
    """Rotates the LAST sin.shape[0] tokens of x (B, N, heads, head_dim); leading tokens (cls,
    registers) pass unrotated. With `bf16` all of q/k (prefix tokens too, as the release casts
    the whole tensor to the tables' dtype) and every op of the rotation are rounded to bfloat16
    (lax.reduce_precision survives XLA's excess-precision rewrites), then cast back."""
    n_rot = sin.shape[0]
    sin = jnp.asarray(sin)[None, :, None, :]
    cos = jnp.asarray(cos)[None, :, None, :]
    y = x.astype(jnp.float32)
    if bf16:
        rp = functools.partial(jax.lax.reduce_precision, exponent_bits=8, mantissa_bits=7)
        y = rp(y)
        prefix, t = y[:, : y.shape[1] - n_rot], y[:, y.shape[1] - n_rot:]
        t = rp(rp(t * cos) + rp(_rotate_half(t) * sin))
    else:
        prefix, t = y[:, : y.shape[1] - n_rot], y[:, y.shape[1] - n_rot:]
        t = t * cos + _rotate_half(t) * sin
    return jnp.concatenate([prefix, t], axis=1).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention, MLP, Block.
# ----------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, optional per-head QK RMSNorm and RoPE."""

    num_heads: int
    qk_norm: bool = False
    causal: bool = False
    rope_bf16: bool = True
    implementation: str | None = None  # jax.nn.dot_product_attention: None/'xla'/'cudnn'
    qkv_std: float = 0.02
    proj_std: float = 0.02
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, rope=None):
        width = x.shape[-1]
        head_dim = width // self.num_heads
        qkv = dense((3, self.num_heads, head_dim), ("embed", None, "heads", "kv"),
                    std=self.qkv_std, dtype=self.dtype, name="qkv", in_shape=(width,))(x)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        if self.qk_norm:  # before RoPE, as in the release.
            q = norm_layer("rmsnorm", name="q_norm", dtype=self.dtype)(q)
            k = norm_layer("rmsnorm", name="k_norm", dtype=self.dtype)(k)
        if rope is not None:
            q = apply_rope(q, *rope, bf16=self.rope_bf16)
            k = apply_rope(k, *rope, bf16=self.rope_bf16)
        impl = None if self.implementation in (None, "xla") else self.implementation
        if impl is None:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal, implementation=impl)
        return dense(width, ("heads", "kv", "embed"), std=self.proj_std, dtype=self.dtype, name="proj",
                     in_shape=(self.num_heads, head_dim))(out)


class Mlp(nn.Module):
    """SwiGLU (w3(silu(w1 x) * w2 x), released trunk/decoder) or GELU MLP (fc2(gelu(fc1 x)))."""

    hidden: int
    kind: str = "swiglu"
    fc_std: float = 0.02
    proj_std: float = 0.02
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        if self.kind == "swiglu":
            h = nn.silu(dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="w1")(x))
            h = h * dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="w2")(x)
            return dense(width, ("mlp", "embed"), dtype=self.dtype, name="w3")(h)
        if self.kind == "gelu":
            h = dense(self.hidden, ("embed", "mlp"), std=self.fc_std, dtype=self.dtype, name="fc1")(x)
            h = nn.gelu(h, approximate=False)
            return dense(width, ("mlp", "embed"), std=self.proj_std, dtype=self.dtype, name="fc2")(h)
        raise ValueError(f"unknown mlp {self.kind!r}: expected 'swiglu' or 'gelu'")


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)); x + ls2(mlp(norm2 x)).

    Stochastic depth is DINOv2's batch-subset variant: each residual branch runs on a random
    subset of int(B * (1 - rate)) samples and is added back scaled by B / kept, which saves the
    dropped samples' compute instead of multiplying them by zero.
    """

    num_heads: int
    mlp_hidden: int
    mlp: str = "swiglu"
    norm: str = "rmsnorm"
    norm_eps: float | None = None
    qk_norm: bool = False
    layerscale: float | None = None
    causal: bool = False
    rope_bf16: bool = True
    attention: str | None = None
    init_stds: tuple = (0.02, 0.02, 0.02, 0.02)  # qkv, attn proj, mlp fc, mlp proj
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, rope=None, drop_rate: float = 0.0):
        qkv_std, proj_std, fc_std, mlp_proj_std = self.init_stds
        # Keeps GSPMD from sharding activations along features under FSDP (no-op without rules).
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        attn = Attention(self.num_heads, self.qk_norm, self.causal, self.rope_bf16, self.attention,
                         qkv_std, proj_std, self.dtype, name="attn")
        mlp = Mlp(self.mlp_hidden, self.mlp, fc_std, mlp_proj_std, self.dtype, name="mlp")
        norm1 = norm_layer(self.norm, self.norm_eps, "norm1", self.dtype)
        norm2 = norm_layer(self.norm, self.norm_eps, "norm2", self.dtype)

        def scale(name):
            if self.layerscale is None:
                return lambda y: y
            gamma = self.param(name, param_with_axes(nn.initializers.constant(self.layerscale), ("norm",)),
                               (x.shape[-1],), jnp.float32)
            return lambda y: y * gamma.astype(y.dtype)

        ls1, ls2 = scale("ls1"), scale("ls2")
        x = self._residual(x, lambda y: ls1(attn(norm1(y), rope)), drop_rate)
        return self._residual(x, lambda y: ls2(mlp(norm2(y))), drop_rate)

    def _residual(self, x, branch, drop_rate):
        if drop_rate <= 0.0:
            return x + branch(x)
        b = x.shape[0]
        keep = max(int(b * (1.0 - drop_rate)), 1)
        idx = jax.random.permutation(self.make_rng("drop_path"), b)[:keep]
        return x.at[idx].add(branch(x[idx]) * jnp.asarray(b / keep, x.dtype))


def remat_block(policy: str):
    """The Block class wrapped in jax.checkpoint per config ('none' | 'full' | 'dots')."""
    if policy == "none":
        return Block
    if policy == "full":
        return nn.remat(Block, static_argnums=(3,))
    if policy == "dots":
        return nn.remat(Block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                        static_argnums=(3,))
    raise ValueError(f"unknown remat policy {policy!r}: expected 'none', 'full' or 'dots'")
