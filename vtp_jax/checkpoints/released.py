"""Import a released VTP checkpoint folder (`config.json` + `model.safetensors`) into JAX.

The release stores PyTorch layouts: Linear (out, in), Conv2d (out, in, kh, kw), fused qkv rows
ordered [q; k; v] with heads as h * head_dim + d, and the text tower's nn.MultiheadAttention
`in_proj_*`. Every tensor is mapped explicitly; anything missing, unexpected or mis-shaped is
collected and reported in one error so that a user fixes a bad checkpoint in one go.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import jax
import ml_collections
import ml_dtypes
import numpy as np

from vtp_jax import config as config_lib
from vtp_jax.models import layers as layers_lib
from vtp_jax.models import vtp as vtp_lib

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32}


class CheckpointError(ValueError):
    """A release folder whose files do not match what its config.json describes."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file as float32 NumPy arrays (bf16 / f16 upcast)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100 << 20:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
        data = np.memmap(path, np.uint8, mode="r", offset=8 + n)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors header: {e}") from e
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end > data.size:
            raise CheckpointError(f"{path}: tensor {name!r} lies past the end of the file (truncated?)")
        a = np.frombuffer(data[start:end], _ST_DTYPES[info["dtype"]]).reshape(info["shape"])
        out[name] = a.astype(np.float32) if a.dtype != np.int64 and a.dtype != np.int32 else a
    return out


# --------------------------------------------------------------------------------------------
# config.json (official field names) -> our model config.
# --------------------------------------------------------------------------------------------
_FFN = {"swiglu": "swiglu", "mlp": "gelu"}
_NORM = {"rmsnorm": "rmsnorm", "layernorm": "layernorm"}
# Release options whose other values change the computation in ways we do not implement.
_FIXED = {
    "vision_bottleneck_ae_only": True, "text_ls_init_value": None, "text_embed_cls": False,
    "text_no_causal_mask": False, "text_pool_type": "argmax", "text_proj_type": "linear",
    "text_proj_bias": False, "text_quick_gelu": False, "init_logit_bias": None, "text_pad_id": 0,
}


def config_from_release(rc: dict) -> ml_collections.ConfigDict:
    """Our model config for any release config.json (not only S/B/L)."""
    g = lambda k, d=None: rc.get(k, d)  # noqa: E731
    bad = [f"{k}={rc[k]!r} (supported: {v!r})" for k, v in _FIXED.items() if k in rc and rc[k] != v]
    for k, table in (("vision_ffn_layer", _FFN), ("decoder_ffn_layer", _FFN),
                     ("vision_norm_layer", _NORM), ("decoder_norm_layer", _NORM)):
        if k in rc and rc[k] not in table:
            bad.append(f"{k}={rc[k]!r} (supported: {sorted(table)})")
    if bad:
        raise CheckpointError("config.json uses options vtp-jax does not implement: " + "; ".join(bad))
    c = config_lib.model_config()
    c.patch_size = g("vision_patch_size", 16)
    c.width, c.depth, c.num_heads = g("vision_embed_dim", 768), g("vision_depth", 12), g("vision_num_heads", 12)
    c.mlp, c.mlp_ratio = _FFN[g("vision_ffn_layer", "swiglu")], float(g("vision_mlp_ratio", 4.0))
    c.norm = _NORM[g("vision_norm_layer", "rmsnorm")]
    c.layerscale = g("vision_init_values")
    c.qk_norm = bool(g("vision_use_qk_norm", False))
    c.latent_dim = g("vision_feature_bottleneck", 64)
    c.clip_feat = g("vision_clip_feat", "cls")
    c.rope_bf16 = True  # the release's RoPE dtype
    if g("train_reconstruction", True):
        c.decoder.width, c.decoder.depth = g("decoder_embed_dim", 768), g("decoder_depth", 12)
        c.decoder.num_heads = g("decoder_num_heads", 12)
        c.decoder.mlp = _FFN[g("decoder_ffn_layer", "swiglu")]
        c.decoder.norm = _NORM[g("decoder_norm_layer", "layernorm")]
        c.decoder.layerscale = g("decoder_init_values")
        c.decoder.qk_norm = bool(g("decoder_use_qk_norm", False))
    else:
        c.decoder.depth = 0
    if g("train_clip", True):
        c.text.width, c.text.depth = g("text_embed_dim", 768), g("text_depth", 12)
        c.text.num_heads, c.text.mlp_ratio = g("text_num_heads", 12), float(g("text_mlp_ratio", 4.0))
        c.text.vocab_size, c.text.context_length = g("text_vocab_size", 49408), g("text_context_length", 77)
        c.clip_dim = c.text.width  # the release projects both towers to text_embed_dim
        if g("init_logit_scale") is not None:
            c.init_logit_scale = float(g("init_logit_scale"))
    else:
        c.text.depth = 0
    c.head.prototypes = 0  # no DINO head weights are released
    return c


# --------------------------------------------------------------------------------------------
# Tensor mapping: release key -> (our param path, transform).
# --------------------------------------------------------------------------------------------
def _t(a):  # Linear (out, in) -> Dense (in, out)
    return a.T


def _block_map(prefix: str, ours: str, c_heads: int, width: int, *, mlp: str, norm: str, qk_norm: bool,
               layerscale: bool, text: bool) -> dict[str, tuple[str, Callable]]:
    """The mapping of one transformer block (trunk / decoder naming, or OpenCLIP text naming)."""
    dh = width // c_heads
    qkv_k = lambda a: a.T.reshape(width, 3, c_heads, dh)  # noqa: E731
    qkv_b = lambda a: a.reshape(3, c_heads, dh)  # noqa: E731
    proj_k = lambda a: a.T.reshape(c_heads, dh, width)  # noqa: E731
    ident = lambda a: a  # noqa: E731
    m = {}
    if text:
        names = dict(norm1="ln_1", norm2="ln_2", qkv_w="attn.in_proj_weight", qkv_b="attn.in_proj_bias",
                     proj="attn.out_proj", fc1="mlp.c_fc", fc2="mlp.c_proj")
    else:
        names = dict(norm1="norm1", norm2="norm2", qkv_w="attn.qkv.weight", qkv_b="attn.qkv.bias",
                     proj="attn.proj", fc1="mlp.fc1", fc2="mlp.fc2")
    for n in ("norm1", "norm2"):
        m[f"{prefix}.{names[n]}.weight"] = (f"{ours}/{n}/scale", ident)
        if norm == "layernorm":
            m[f"{prefix}.{names[n]}.bias"] = (f"{ours}/{n}/bias", ident)
    m[f"{prefix}.{names['qkv_w']}"] = (f"{ours}/attn/qkv/kernel", qkv_k)
    m[f"{prefix}.{names['qkv_b']}"] = (f"{ours}/attn/qkv/bias", qkv_b)
    m[f"{prefix}.{names['proj']}.weight"] = (f"{ours}/attn/proj/kernel", proj_k)
    m[f"{prefix}.{names['proj']}.bias"] = (f"{ours}/attn/proj/bias", ident)
    if qk_norm:
        m[f"{prefix}.attn.q_norm.weight"] = (f"{ours}/attn/q_norm/scale", ident)
        m[f"{prefix}.attn.k_norm.weight"] = (f"{ours}/attn/k_norm/scale", ident)
    if layerscale:
        m[f"{prefix}.ls1.gamma"] = (f"{ours}/ls1", ident)
        m[f"{prefix}.ls2.gamma"] = (f"{ours}/ls2", ident)
    linears = ("w1", "w2", "w3") if mlp == "swiglu" else ("fc1", "fc2")
    for n in linears:
        src = names[n] if n in ("fc1", "fc2") else f"mlp.{n}"
        m[f"{prefix}.{src}.weight"] = (f"{ours}/mlp/{n}/kernel", _t)
        m[f"{prefix}.{src}.bias"] = (f"{ours}/mlp/{n}/bias", ident)
    return m


def key_map(c: ml_collections.ConfigDict) -> dict[str, tuple[str, Callable]]:
    """Every release tensor name for config `c`, with our path and layout transform."""
    ident = lambda a: a  # noqa: E731
    conv1x1 = lambda a: a[:, :, 0, 0].T  # noqa: E731
    m = {
        "trunk.patch_embed.proj.weight": ("trunk/patch_embed/kernel", lambda a: a.transpose(2, 3, 1, 0)),
        "trunk.patch_embed.proj.bias": ("trunk/patch_embed/bias", ident),
        "trunk.cls_token": ("trunk/cls_token", ident),
        "trunk.mask_token": ("trunk/mask_token", ident),
        "trunk.norm.weight": ("trunk/norm/scale", ident),
        "trunk.feature_bottleneck.weight": ("feature_bottleneck/kernel", _t),
    }
    if c.norm == "layernorm":
        m["trunk.norm.bias"] = ("trunk/norm/bias", ident)
    if c.n_registers:
        m["trunk.storage_tokens"] = ("trunk/registers", ident)
    for i in range(c.depth):
        m.update(_block_map(f"trunk.blocks.{i}", f"trunk/blocks_{i}", c.num_heads, c.width, mlp=c.mlp,
                            norm=c.norm, qk_norm=c.qk_norm, layerscale=c.layerscale is not None, text=False))
    d = c.decoder
    if d.depth:
        m.update({
            "pixel_decoder.proj_in.weight": ("pixel_decoder/proj_in/kernel", conv1x1),
            "pixel_decoder.proj_in.bias": ("pixel_decoder/proj_in/bias", ident),
            "pixel_decoder.norm.weight": ("pixel_decoder/norm/scale", ident),
            "pixel_decoder.proj_out.weight": ("pixel_decoder/proj_out/kernel", conv1x1),
            "pixel_decoder.proj_out.bias": ("pixel_decoder/proj_out/bias", ident),
        })
        if d.norm == "layernorm":
            m["pixel_decoder.norm.bias"] = ("pixel_decoder/norm/bias", ident)
        for i in range(d.depth):
            m.update(_block_map(f"pixel_decoder.blocks.{i}", f"pixel_decoder/blocks_{i}", d.num_heads, d.width,
                                mlp=d.mlp, norm=d.norm, qk_norm=d.qk_norm, layerscale=d.layerscale is not None,
                                text=False))
    t = c.text
    if t.depth:
        m.update({
            "token_embedding.weight": ("text/token_embedding", ident),
            "positional_embedding": ("text/positional_embedding", ident),
            "ln_final.weight": ("text/ln_final/scale", ident),
            "ln_final.bias": ("text/ln_final/bias", ident),
            "text_projection": ("text/text_projection", ident),  # stored (width, out) already
            "visual_proj.weight": ("visual_proj/kernel", _t),
            "logit_scale": ("logit_scale", lambda a: a.reshape(())),
        })
        for i in range(t.depth):
            m.update(_block_map(f"text_transformer.resblocks.{i}", f"text/blocks_{i}", t.num_heads, t.width,
                                mlp="gelu", norm="layernorm", qk_norm=False, layerscale=False, text=True))
    return m


def _rope_buffers(c) -> dict[str, np.ndarray]:
    """The release's non-learned RoPE `periods` buffers, which must match our RoPE config."""
    def periods(width, heads):
        dh = width // heads
        r = layers_lib._round_bf16
        return r(np.float32(c.rope_base) ** r(r(2 * r(np.arange(dh // 4))) / np.float32(dh // 2)))

    out = {"trunk.rope_embed.periods": periods(c.width, c.num_heads)}
    if c.decoder.depth:
        out["pixel_decoder.rope_embed.periods"] = periods(c.decoder.width, c.decoder.num_heads)
    return out


def convert(tensors: dict[str, np.ndarray], c: ml_collections.ConfigDict):
    """Release tensors -> our unboxed float32 params, or one CheckpointError naming every bad key."""
    mapping = key_map(c)
    buffers = _rope_buffers(c)
    shapes = vtp_lib.param_shapes(c)
    flat_shapes = {"/".join(k): v.shape for k, v in _flatten(shapes).items()}
    missing = sorted(k for k in mapping if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in mapping and k not in buffers)
    problems = []
    flat = {}
    for k, (path, fn) in mapping.items():
        if k not in tensors:
            continue
        try:
            a = fn(np.asarray(tensors[k], np.float32))
        except (ValueError, IndexError) as e:
            problems.append(f"{k}: shape {tuple(tensors[k].shape)} cannot map to {path} ({e})")
            continue
        if a.shape != flat_shapes[path]:
            problems.append(f"{k}: shape {tuple(tensors[k].shape)} does not fit {path} {flat_shapes[path]}")
            continue
        flat[path] = a
    for k, want in buffers.items():
        if k in tensors and (tensors[k].shape != want.shape or not np.allclose(tensors[k], want, rtol=1e-2)):
            problems.append(f"{k}: RoPE periods {np.asarray(tensors[k]).ravel()[:4]}... differ from the "
                            f"configured rope_base={c.rope_base} ({want[:4]}...)")
    if missing or unexpected or problems:
        lines = [f"missing key: {k}" for k in missing] + [f"unexpected key: {k}" for k in unexpected] + problems
        raise CheckpointError(f"checkpoint does not match its config ({len(lines)} problem(s)):\n  "
                              + "\n  ".join(lines))
    assert set(flat) == set(flat_shapes), sorted(set(flat_shapes) ^ set(flat))
    return _unflatten(flat)


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: dict[str, np.ndarray]):
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def load_release(folder: str):
    """(model config, params) from a release folder."""
    cfg_path, st_path = os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")
    for p in (cfg_path, st_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found: a released VTP folder holds config.json and model.safetensors")
    with open(cfg_path) as f:
        try:
            rc = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from e
    c = config_from_release(rc)
    params = convert(read_safetensors(st_path), c)
    return c, jax.tree.map(np.asarray, params)
