"""pytorch-fid's FID Inception-v3 in Flax: the feature extractor behind FID and the Inception Score.

FID numbers are only comparable when the extractor matches to the last detail, so this is the
network of pytorch-fid's `fid_inception_v3` (TF's 2015-12-05 Inception graph in torchvision's
layout) and not torchvision's ImageNet Inception-v3. The FID variant differs in exactly three ways:
1008 classes; the average-pool branches of the A, C and first E blocks exclude the zero padding
from the mean (TF's pooling); and the last E block pools its branch with a MAX pool.

Every conv is torchvision's BasicConv2d (conv without bias, BatchNorm with eps 1e-3 in inference
mode, ReLU); the running statistics live in 'params' next to the affine ones, so the network is
a pure function of one params tree. Parameter names follow the torch module names
(`Mixed_5b/branch5x5_2/kernel`), which keeps the converter's key map obvious. Input: NHWC in
[-1, 1]; the resize to 299x299 that defines FID lives in `vtp_jax.evals.fid`.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from vtp_jax.models.layers import param_with_axes

Dtype = Any

BN_EPS = 1e-3  # torchvision BasicConv2d; TF's batch-norm epsilon.
NUM_CLASSES = 1008  # TF's Inception graph: 1000 ImageNet classes + 8 unused.
FEATURE_DIM = 2048  # the final global average pool ("pool_3"), FID's features.
INPUT_SIZE = 299
# sFID's features (ADM's evaluator): TF's `mixed_6/conv`, the first 7 of its 192 channels on the
# 17 x 17 grid at 299 px, flattened in (row, column, channel) order: 17 * 17 * 7 = 2023.
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS

# A frozen ~24M-parameter evaluation network: every parameter is replicated on every device.
_KERNEL_AXES = (None, None, None, None)
_VECTOR_AXES = ("norm",)


class ConvBN(nn.Module):
    """torchvision's BasicConv2d at inference: conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU."""

    features: int
    kernel_size: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", param_with_axes(nn.initializers.lecun_normal(), _KERNEL_AXES),
                            (*self.kernel_size, x.shape[-1], self.features), jnp.float32)

        def vector(name, init):
            return self.param(name, param_with_axes(init, _VECTOR_AXES), (self.features,), jnp.float32)

        scale, bias = vector("scale", nn.initializers.ones), vector("bias", nn.initializers.zeros)
        mean, var = vector("mean", nn.initializers.zeros), vector("var", nn.initializers.ones)
        # float32 convs are the FID reference; without HIGHEST, GPUs / TPUs would round to TF32 / bf16.
        precision = jax.lax.Precision.HIGHEST if jnp.dtype(self.dtype) == jnp.float32 else None
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride),
            [(p, p) for p in self.padding], dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
        alpha = scale * jax.lax.rsqrt(var + BN_EPS)
        y = y.astype(jnp.float32) * alpha + (bias - mean * alpha)
        return nn.relu(y).astype(self.dtype)


def avg_pool_3x3(x):
    """3x3 stride-1 'same' average that ignores the padding (count_include_pad=False), as TF."""
    return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3(x, stride):
    """3x3 max pool: stride 2 unpadded (grid reductions) or stride 1 'same' (-inf padding)."""
    padding = "VALID" if stride == 2 else ((1, 1), (1, 1))
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class InceptionA(nn.Module):
    """FIDInceptionA (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1 -> 224 + pool_features."""

    pool_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(ConvBN, dtype=self.dtype)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a, the 35 -> 17 grid reduction: 3x3/2 | 1x1-3x3-3x3/2 | max pool/2 -> 480 + C_in."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(ConvBN, dtype=self.dtype)
        b3 = conv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
    """FIDInceptionC (Mixed_6b..e): factorized 7x7 branches of `channels_7x7` width -> 768."""

    channels_7x7: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, with_branch1x1: bool = False):
        """With `with_branch1x1`, (output, the 1x1 branch's activations): sFID's tap in Mixed_6d."""
        conv = functools.partial(ConvBN, dtype=self.dtype)
        c = self.channels_7x7
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c, **row, name="branch7x7_2")(b7)
        b7 = conv(192, **col, name="branch7x7_3")(b7)
        bd = conv(c, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c, **col, name="branch7x7dbl_2")(bd)
        bd = conv(c, **row, name="branch7x7dbl_3")(bd)
        bd = conv(c, **col, name="branch7x7dbl_4")(bd)
        bd = conv(192, **row, name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(avg_pool_3x3(x))
        out = jnp.concatenate([b1, b7, bd, bp], axis=-1)
        return (out, b1) if with_branch1x1 else out


class InceptionD(nn.Module):
    """Mixed_7a, the 17 -> 8 grid reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2 -> 512 + C_in."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(ConvBN, dtype=self.dtype)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (Mixed_7b, avg pool branch) / FIDInceptionE_2 (Mixed_7c, `max_pool`) -> 2048."""

    max_pool: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(ConvBN, dtype=self.dtype)
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([conv(384, **row, name="branch3x3_2a")(b3),
                              conv(384, **col, name="branch3x3_2b")(b3)], axis=-1)
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([conv(384, **row, name="branch3x3dbl_3a")(bd),
                              conv(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = max_pool_3x3(x, 1) if self.max_pool else avg_pool_3x3(x)
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """NHWC images in [-1, 1] -> (B, 2048) pool features; `logits` adds the 1008-way fc layer.

    Children are named as in the torch state dict, the stem's convs at the top level.
    """

    dtype: Dtype = jnp.float32

    def setup(self):
        conv = functools.partial(ConvBN, dtype=self.dtype)
        self.Conv2d_1a_3x3 = conv(32, (3, 3), stride=2)
        self.Conv2d_2a_3x3 = conv(32, (3, 3))
        self.Conv2d_2b_3x3 = conv(64, (3, 3), padding=(1, 1))
        self.Conv2d_3b_1x1 = conv(80, (1, 1))
        self.Conv2d_4a_3x3 = conv(192, (3, 3))
        self.Mixed_5b = InceptionA(32, self.dtype)
        self.Mixed_5c = InceptionA(64, self.dtype)
        self.Mixed_5d = InceptionA(64, self.dtype)
        self.Mixed_6a = InceptionB(self.dtype)
        self.Mixed_6b = InceptionC(128, self.dtype)
        self.Mixed_6c = InceptionC(160, self.dtype)
        self.Mixed_6d = InceptionC(160, self.dtype)
        self.Mixed_6e = InceptionC(192, self.dtype)
        self.Mixed_7a = InceptionD(self.dtype)
        self.Mixed_7b = InceptionE(max_pool=False, dtype=self.dtype)
        self.Mixed_7c = InceptionE(max_pool=True, dtype=self.dtype)
        self.fc = nn.Dense(NUM_CLASSES, param_dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST,
                           kernel_init=param_with_axes(nn.initializers.lecun_normal(), (None, None)),
                           bias_init=param_with_axes(nn.initializers.zeros, (None,)))

    def stem(self, x):
        """Conv2d_1a .. Conv2d_4a with two 3x3/2 max pools: 299x299x3 -> 35x35x192."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool_3x3(x, 2)))
        return max_pool_3x3(x, 2)

    def __call__(self, x):
        x = self.stem(x)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

    def logits(self, x):
        return self.fc(self(x))

    def pool_and_spatial(self, x):
        """((B, 2048) pool features, (B, h, w, 192) sFID tap) from one pass.

        The tap is ADM's `mixed_6/conv:0`. TF's graph numbers its Inception blocks mixed,
        mixed_1, mixed_2 (35 x 35: Mixed_5b/c/d), mixed_3 (the reduction, Mixed_6a), mixed_4 ..
        mixed_7 (17 x 17: Mixed_6b..e), so mixed_6 is Mixed_6d; its `conv` is the 1x1 branch, and
        the tensor of that name is the op after the batch norm, the ReLU: here Mixed_6d.branch1x1's
        ConvBN output (torchvision's BasicConv2d, whose weights pytorch-fid ported from that
        node). The weights are the same; only TF's resize differs (see vtp_jax.evals.fid).
        """
        x = self.stem(x)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        x, spatial = self.Mixed_6d(x, with_branch1x1=True)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2)), spatial.astype(jnp.float32)


@functools.lru_cache(maxsize=1)
def _param_shapes():
    img = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    params = jax.eval_shape(functools.partial(FIDInceptionV3().init, method="logits"), jax.random.key(0), img)
    # The boxes' values, not nn.meta.unbox: unboxing applies sharding constraints under a mesh.
    values = jax.tree.map(lambda x: x.value, params["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    flat = traverse_util.flatten_dict(values, sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def param_shapes() -> dict[str, tuple[int, ...]]:
    """'/'-joined parameter paths -> shapes, derived from the module so files are checked against it."""
    return dict(_param_shapes())

