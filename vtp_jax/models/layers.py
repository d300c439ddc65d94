"""The one transformer block of vtp-jax and its parts.

The same `Block` serves the vision trunk (RMSNorm, SwiGLU, RoPE on patch tokens), the pixel
decoder (LayerNorm, SwiGLU, RoPE on all tokens) and the text tower (LayerNorm, GELU, causal).
Every parameter carries logical axis names ('embed', 'mlp', 'heads', 'kv', 'vocab', 'norm') so
that the trainer shards them by rules declared once in `vtp_jax.sharding`.

A stack of blocks runs unrolled (modules blocks_0 .. blocks_{depth-1}) or under one `nn.scan`
(one module `blocks` whose parameters carry a leading 'layers' axis): scanning compiles one block
whatever the depth. `stack_blocks` / `unstack_blocks` convert parameters between the layouts.
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

from vtp_jax.sharding import n_batch_shards

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


@functools.lru_cache(maxsize=64)
def interleaved_rope_tables(h: int, w: int, head_dim: int, theta: float = 10000.0):
    """(sin, cos), each (h*w, head_dim) float32: LightningDiT's RoPE (EVA-02's
    VisionRotaryEmbeddingFast), for `apply_rope(..., pairing="interleaved")`.

    The first half of head_dim rotates with the row index, the second half with the column
    index, at frequencies theta^(-2k/(head_dim/2)), k < head_dim/4, each repeated for the two
    members of a pair (2i, 2i+1). Positions are EVA's arange(n) / n * n: integers up to float32
    rounding. Computed in float32 in the reference's order, so its buffers compare closely.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = np.float32(1.0) / np.float32(theta) ** (np.arange(0, half, 2, dtype=np.float32) / np.float32(half))

    def axis_angles(n):
        pos = np.arange(n, dtype=np.float32) / np.float32(n) * np.float32(n)
        return np.repeat(pos[:, None] * freqs[None, :], 2, axis=-1)  # (n, half), pairs interleaved

    rows, cols = axis_angles(h), axis_angles(w)
    angles = np.concatenate([np.broadcast_to(rows[:, None], (h, w, half)),
                             np.broadcast_to(cols[None, :], (h, w, half))], axis=-1).reshape(h * w, head_dim)
    return np.sin(angles), np.cos(angles)


def _rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def _rotate_interleaved(x):
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


_ROTATIONS = {"half": _rotate_half, "interleaved": _rotate_interleaved}


def apply_rope(x, sin, cos, *, bf16: bool, pairing: str = "half"):
    """Rotates the LAST sin.shape[0] tokens of x (B, N, heads, head_dim); leading tokens (cls,
    registers) pass unrotated. With `bf16` all of q/k (prefix tokens too, as the release casts
    the whole tensor to the tables' dtype) and every op of the rotation are rounded to bfloat16
    (lax.reduce_precision survives XLA's excess-precision rewrites), then cast back.

    `pairing` says which dimensions rotate together: "half" pairs i with i + head_dim/2 (the
    VTP release), "interleaved" pairs 2i with 2i+1 (EVA / LightningDiT)."""
    if pairing not in _ROTATIONS:
        raise ValueError(f"unknown RoPE pairing {pairing!r}: expected 'half' or 'interleaved'")
    rotate = _ROTATIONS[pairing]
    n_rot = sin.shape[0]
    sin = jnp.asarray(sin)[None, :, None, :]
    cos = jnp.asarray(cos)[None, :, None, :]
    y = x.astype(jnp.float32)
    if bf16:
        rp = functools.partial(jax.lax.reduce_precision, exponent_bits=8, mantissa_bits=7)
        y = rp(y)
        prefix, t = y[:, : y.shape[1] - n_rot], y[:, y.shape[1] - n_rot:]
        t = rp(rp(t * cos) + rp(rotate(t) * sin))
    else:
        prefix, t = y[:, : y.shape[1] - n_rot], y[:, y.shape[1] - n_rot:]
        t = t * cos + rotate(t) * sin
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
    rope_pairing: str = "half"  # see apply_rope
    qk_norm_eps: float | None = None  # None: norm_layer's RMSNorm default (1e-5, the release)

    @nn.compact
    def __call__(self, x, rope=None):
        width = x.shape[-1]
        head_dim = width // self.num_heads
        qkv = dense((3, self.num_heads, head_dim), ("embed", None, "heads", "kv"),
                    std=self.qkv_std, dtype=self.dtype, name="qkv", in_shape=(width,))(x)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        if self.qk_norm:  # before RoPE, as in the release.
            q = norm_layer("rmsnorm", self.qk_norm_eps, name="q_norm", dtype=self.dtype)(q)
            k = norm_layer("rmsnorm", self.qk_norm_eps, name="k_norm", dtype=self.dtype)(k)
        if rope is not None:
            q = apply_rope(q, *rope, bf16=self.rope_bf16, pairing=self.rope_pairing)
            k = apply_rope(k, *rope, bf16=self.rope_bf16, pairing=self.rope_pairing)
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
    dropped samples' compute instead of multiplying them by zero. Build it with keywords: its many
    flags are easy to swap by position.
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
        attn = Attention(num_heads=self.num_heads, qk_norm=self.qk_norm, causal=self.causal, rope_bf16=self.rope_bf16,
                         implementation=self.attention, qkv_std=qkv_std, proj_std=proj_std, dtype=self.dtype,
                         name="attn")
        mlp = Mlp(hidden=self.mlp_hidden, kind=self.mlp, fc_std=fc_std, proj_std=mlp_proj_std, dtype=self.dtype,
                  name="mlp")
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
        # The subset is drawn within each batch shard (as DINOv2 draws it per GPU): x is viewed as
        # (shards, per_shard, ...) and the same positions are taken from every shard, so the gather
        # and the scatter-add stay local and move no activations between devices.
        b = x.shape[0]
        shards = n_batch_shards()
        shards = shards if b % shards == 0 else 1
        per_shard = b // shards
        keep = max(int(per_shard * (1.0 - drop_rate)), 1)
        idx = jax.random.permutation(self.make_rng("drop_path"), per_shard)[:keep]
        xs = nn.with_logical_constraint(x.reshape(shards, per_shard, *x.shape[1:]),
                                        ("activation_batch",) + (None,) * x.ndim)
        y = branch(xs[:, idx].reshape(shards * keep, *x.shape[1:]))
        xs = xs.at[:, idx].add(y.reshape(shards, keep, *x.shape[1:]) * jnp.asarray(per_shard / keep, x.dtype))
        return xs.reshape(x.shape)


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


# ----------------------------------------------------------------------------------------------
# Stacks of blocks: unrolled or scanned, and the two parameter layouts.
# ----------------------------------------------------------------------------------------------
SCANNED = "blocks"  # the scanned stack's module name; unrolled blocks are blocks_0, blocks_1, ...


def apply_blocks(make_block, depth: int, x, *shared, static: tuple = (), scan: bool = False, keep=()):
    """x through `depth` blocks, each called as block(x, *shared, *static); returns (x, the
    outputs of the blocks whose indices are in `keep`, in block order).

    `make_block(name)` builds one block module. `shared` are arrays every block sees (RoPE tables,
    conditioning), broadcast into the scan; `static` are Python values (a remat'ed Block's static
    drop rate). Under scan, per-layer rngs ('params', 'drop_path') are split per layer and the kept
    outputs are written into a carried (len(keep), ...) buffer, so that a stack asked for no
    outputs traces none and one asked for a few holds only those, not every layer's.
    """
    keep = sorted(set(keep))
    if not scan:
        kept = []
        for i in range(depth):
            x = make_block(f"blocks_{i}")(x, *shared, *static)
            if i in keep:
                kept.append(x)
        return x, kept

    slots = np.full(depth, len(keep), np.int32)  # the buffer slot of each block; len(keep): none
    slots[keep] = np.arange(len(keep))

    def body(block, carry, slot, *shared):
        y, kept = carry
        y = block(y, *shared, *static)
        if keep:
            kept = kept.at[slot].set(y, mode="drop")
        return (y, kept), None

    stack = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "drop_path": True},
                    in_axes=(0,) + (nn.broadcast,) * len(shared), length=depth,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    buffer = jnp.zeros((len(keep), *x.shape), x.dtype) if keep else None
    (x, buffer), _ = stack(make_block(SCANNED), (x, buffer), slots, *shared)
    return x, list(buffer) if keep else []


def _block_index(name: str) -> int | None:
    prefix = SCANNED + "_"
    return int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else None


def stack_blocks(params):
    """Unrolled -> scanned layout: every group blocks_0 .. blocks_{n-1} of the (unboxed) params
    becomes one `blocks` subtree whose leaves are stacked on a new leading axis (host NumPy)."""
    if not isinstance(params, dict):
        return params
    indices = sorted(i for i in map(_block_index, params) if i is not None)
    out = {k: stack_blocks(v) for k, v in params.items() if _block_index(k) is None}
    if indices:
        if indices != list(range(len(indices))):
            raise ValueError(f"cannot stack blocks {indices}: expected blocks_0 .. blocks_{len(indices) - 1}")
        if SCANNED in out:
            raise ValueError(f"params hold both '{SCANNED}' and {SCANNED}_0 ..: mixed layouts")
        blocks = [params[f"{SCANNED}_{i}"] for i in indices]
        try:
            out[SCANNED] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *blocks)
        except ValueError as e:
            raise ValueError(f"blocks_0 .. blocks_{len(indices) - 1} differ in structure or shape: {e}") from e
    return out


def unstack_blocks(params):
    """Scanned -> unrolled layout (the inverse of `stack_blocks`): every `blocks` subtree with
    leading depth axis becomes blocks_0 .. blocks_{depth-1} (host NumPy)."""
    if not isinstance(params, dict):
        return params
    out = {k: unstack_blocks(v) for k, v in params.items() if k != SCANNED}
    if SCANNED in params:
        stacked = jax.tree.map(np.asarray, params[SCANNED])
        depths = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(stacked)}
        if len(depths) != 1 or None in depths:
            raise ValueError(f"'{SCANNED}' leaves do not share one leading depth axis: {sorted(map(str, depths))}")
        for i in range(depths.pop()):
            out[f"{SCANNED}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out
