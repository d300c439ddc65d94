"""Import a released VTP checkpoint folder (`config.json` + `model.safetensors`) into JAX.

The release stores PyTorch layouts: Linear (out, in), Conv2d (out, in, kh, kw), fused qkv rows
ordered [q; k; v] with heads as h * head_dim + d, and the text tower's nn.MultiheadAttention
`in_proj_*`. Every tensor is mapped explicitly; anything missing, unexpected or mis-shaped is
collected and reported in one error so that a user fixes a bad checkpoint in one go.
"""
from __future__ import annotations

import json

import jax
import ml_collections
import ml_dtypes
import numpy as np

from vtp_jax import config as config_lib
from vtp_jax import paths
from vtp_jax.checkpoints import hub
from vtp_jax.data import files
from vtp_jax.models import layers as layers_lib
from vtp_jax.models import vtp as vtp_lib


class CheckpointError(ValueError):
    """A release folder whose files do not match what its config.json describes."""


def nonfinite_tensors(tensors: dict) -> list[str]:
    """'name (k NaN, m inf of n)' for every floating-point array holding non-finite values."""
    out = []
    for name, a in tensors.items():
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16:
            a = a.astype(np.float32, copy=False)
            bad = ~np.isfinite(a)
            if bad.any():
                out.append(f"{name} ({int(np.isnan(a).sum())} NaN, {int(np.isinf(a).sum())} inf of {a.size})")
    return out


def check_finite(tensors: dict, source: str, how_to_allow: str) -> None:
    """One CheckpointError naming every tensor of `source` with NaN or inf values."""
    bad = nonfinite_tensors(tensors)
    if bad:
        raise CheckpointError(f"{source}: non-finite weights in {len(bad)} tensor(s): {'; '.join(bad[:5])}"
                              + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "") + f" ({how_to_allow})")


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


# The types of the config.json fields we read: a wrong type is reported here, not as a TypeError
# deep in the model. Integral floats (4.0) are taken as integers.
_INT_FIELDS = ("vision_patch_size", "vision_embed_dim", "vision_depth", "vision_num_heads", "vision_feature_bottleneck",
               "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "text_embed_dim", "text_depth",
               "text_num_heads", "text_vocab_size", "text_context_length")
_FLOAT_FIELDS = ("vision_mlp_ratio", "text_mlp_ratio")
_OPTIONAL_FLOAT_FIELDS = ("vision_init_values", "decoder_init_values", "init_logit_scale")
_BOOL_FIELDS = ("train_clip", "train_reconstruction", "vision_use_qk_norm", "decoder_use_qk_norm")
_CLIP_FEAT = ("cls", "pooled")


def _typed(rc: dict) -> tuple[dict, list[str]]:
    """(rc with integral floats as ints, 'field=value: expected ...' for every mistyped field)."""
    rc, bad = dict(rc), []
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    for k in _INT_FIELDS:
        if k in rc:
            v = rc[k]
            if number(v) and float(v).is_integer() and v > 0:
                rc[k] = int(v)
            else:
                bad.append(f"{k}={v!r}: expected a positive integer")
    for k in _FLOAT_FIELDS + _OPTIONAL_FLOAT_FIELDS:
        positive = k != "init_logit_scale"  # a log scale may be negative
        if k in rc and not (number(rc[k]) and np.isfinite(rc[k]) and (rc[k] > 0 or not positive)
                            or rc[k] is None and k in _OPTIONAL_FLOAT_FIELDS):
            bad.append(f"{k}={rc[k]!r}: expected a {'positive' if positive else 'finite'} number"
                       + (" or null" if k in _OPTIONAL_FLOAT_FIELDS else ""))
    for k in _BOOL_FIELDS:
        if k in rc and not isinstance(rc[k], bool):
            bad.append(f"{k}={rc[k]!r}: expected true or false")
    if "vision_clip_feat" in rc and rc["vision_clip_feat"] not in _CLIP_FEAT:
        bad.append(f"vision_clip_feat={rc['vision_clip_feat']!r}: expected one of {list(_CLIP_FEAT)}")
    if bad:
        return rc, bad
    for tower, default_width, default_heads, rope in (("vision", 768, 12, True), ("decoder", 768, 12, True),
                                                      ("text", 768, 12, False)):
        width, heads = rc.get(f"{tower}_embed_dim", default_width), rc.get(f"{tower}_num_heads", default_heads)
        if width % heads or rope and (width // heads) % 4:
            bad.append(f"{tower}_embed_dim={width} / {tower}_num_heads={heads}: expected a whole head dim"
                       + (" divisible by 4 (axial RoPE)" if rope else ""))
    return rc, bad


def config_from_release(rc: dict, source: str = "config.json") -> ml_collections.ConfigDict:
    """Our model config for any release config.json (not only S/B/L); every problem of `source`
    in one CheckpointError."""
    if not isinstance(rc, dict):
        raise CheckpointError(f"{source}: expected a JSON object of config fields, got {type(rc).__name__}")
    rc, typed = _typed(rc)
    g = lambda k, d=None: rc.get(k, d)  # noqa: E731
    bad = [f"{k}={rc[k]!r} (supported: {v!r})" for k, v in _FIXED.items() if k in rc and rc[k] != v]
    for k, table in (("vision_ffn_layer", _FFN), ("decoder_ffn_layer", _FFN),
                     ("vision_norm_layer", _NORM), ("decoder_norm_layer", _NORM)):
        if k in rc and (not isinstance(rc[k], str) or rc[k] not in table):
            bad.append(f"{k}={rc[k]!r} (supported: {sorted(table)})")
    if bad:
        raise CheckpointError(f"{source} uses options vtp-jax does not implement: " + "; ".join(bad + typed))
    if typed:
        raise CheckpointError(f"{source}: " + "; ".join(typed))
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


# Fields that change the parameters or the forward pass of each part (dtype, remat, the RoPE
# rounding and the attention kernel change neither the parameters nor, beyond rounding, the maths).
_ARCH_FIELDS = {
    "": ("patch_size", "width", "depth", "num_heads", "mlp", "mlp_ratio", "norm", "qk_norm", "layerscale",
         "n_registers", "rope_base", "latent_dim"),
    "decoder.": ("width", "depth", "num_heads", "mlp", "mlp_ratio", "norm", "qk_norm", "layerscale"),
    "text.": ("width", "depth", "num_heads", "mlp_ratio", "vocab_size", "context_length"),
}


def architecture_differences(release: ml_collections.ConfigDict, ours: ml_collections.ConfigDict) -> list[str]:
    """'field: release X, config Y' for every architecture field of the parts `ours` has (a part
    with depth 0 in `ours` is not compared: it is not built)."""
    diffs = []
    for prefix, fields in _ARCH_FIELDS.items():
        part_ours = ours.get(prefix[:-1]) if prefix else ours
        part_rel = release.get(prefix[:-1]) if prefix else release
        if not part_ours.depth:
            continue
        diffs += [f"model.{prefix}{f}: release {part_rel[f]!r}, config {part_ours[f]!r}"
                  for f in fields if part_rel[f] != part_ours[f]]
    if ours.text.depth:
        diffs += [f"model.{f}: release {release[f]!r}, config {ours[f]!r}"
                  for f in ("clip_dim", "clip_feat") if release[f] != ours[f]]
    return diffs


# --------------------------------------------------------------------------------------------
# Tensor mapping: release key -> (our param path, layout). Layouts are invertible, so the same
# table imports released weights and exports ours in the release format.
# --------------------------------------------------------------------------------------------
IDENT, SCALAR, FLAT, CONV, CONV1X1 = "ident", "scalar", "flat", "conv", "conv1x1"
LINEAR, LINEAR_OUT2 = ("T", 1), ("T", 2)  # torch (out, in) -> ours (in..., out...); in has 1 or 2 dims


def to_ours(layout, a: np.ndarray, shape) -> np.ndarray:
    """Release tensor (already checked to have the release shape of `shape`) -> our layout."""
    if layout == IDENT:
        return a
    if layout in (SCALAR, FLAT):
        return a.reshape(shape)
    if layout == CONV:
        return a.transpose(2, 3, 1, 0)
    if layout == CONV1X1:
        return a[:, :, 0, 0].T
    return a.T.reshape(shape)


def to_release(layout, k: np.ndarray) -> np.ndarray:
    """Our array -> the release tensor (the inverse of `to_ours`)."""
    if layout in (IDENT, SCALAR):
        return k
    if layout == FLAT:
        return k.reshape(-1)
    if layout == CONV:
        return k.transpose(3, 2, 0, 1)
    if layout == CONV1X1:
        return k.T[:, :, None, None]
    n_in = layout[1]
    return k.reshape(int(np.prod(k.shape[:n_in])), -1).T


def _block_map(prefix: str, ours: str, *, mlp: str, norm: str, qk_norm: bool, layerscale: bool, text: bool):
    """The mapping of one transformer block (trunk / decoder naming, or OpenCLIP text naming)."""
    if text:
        names = dict(norm1="ln_1", norm2="ln_2", qkv_w="attn.in_proj_weight", qkv_b="attn.in_proj_bias",
                     proj="attn.out_proj", fc1="mlp.c_fc", fc2="mlp.c_proj")
    else:
        names = dict(norm1="norm1", norm2="norm2", qkv_w="attn.qkv.weight", qkv_b="attn.qkv.bias",
                     proj="attn.proj", fc1="mlp.fc1", fc2="mlp.fc2")
    m = {}
    for n in ("norm1", "norm2"):
        m[f"{prefix}.{names[n]}.weight"] = (f"{ours}/{n}/scale", IDENT)
        if norm == "layernorm":
            m[f"{prefix}.{names[n]}.bias"] = (f"{ours}/{n}/bias", IDENT)
    m[f"{prefix}.{names['qkv_w']}"] = (f"{ours}/attn/qkv/kernel", LINEAR)  # rows [q; k; v], head-major
    m[f"{prefix}.{names['qkv_b']}"] = (f"{ours}/attn/qkv/bias", FLAT)
    m[f"{prefix}.{names['proj']}.weight"] = (f"{ours}/attn/proj/kernel", LINEAR_OUT2)
    m[f"{prefix}.{names['proj']}.bias"] = (f"{ours}/attn/proj/bias", IDENT)
    if qk_norm:
        m[f"{prefix}.attn.q_norm.weight"] = (f"{ours}/attn/q_norm/scale", IDENT)
        m[f"{prefix}.attn.k_norm.weight"] = (f"{ours}/attn/k_norm/scale", IDENT)
    if layerscale:
        m[f"{prefix}.ls1.gamma"] = (f"{ours}/ls1", IDENT)
        m[f"{prefix}.ls2.gamma"] = (f"{ours}/ls2", IDENT)
    for n in ("w1", "w2", "w3") if mlp == "swiglu" else ("fc1", "fc2"):
        src = names[n] if n in ("fc1", "fc2") else f"mlp.{n}"
        m[f"{prefix}.{src}.weight"] = (f"{ours}/mlp/{n}/kernel", LINEAR)
        m[f"{prefix}.{src}.bias"] = (f"{ours}/mlp/{n}/bias", IDENT)
    return m


def key_map(c: ml_collections.ConfigDict) -> dict[str, tuple[str, object]]:
    """Every release tensor name for config `c`, with our path and layout."""
    m = {
        "trunk.patch_embed.proj.weight": ("trunk/patch_embed/kernel", CONV),
        "trunk.patch_embed.proj.bias": ("trunk/patch_embed/bias", IDENT),
        "trunk.cls_token": ("trunk/cls_token", IDENT),
        "trunk.mask_token": ("trunk/mask_token", IDENT),
        "trunk.norm.weight": ("trunk/norm/scale", IDENT),
        "trunk.feature_bottleneck.weight": ("feature_bottleneck/kernel", LINEAR),
    }
    if c.norm == "layernorm":
        m["trunk.norm.bias"] = ("trunk/norm/bias", IDENT)
    if c.n_registers:
        m["trunk.storage_tokens"] = ("trunk/registers", IDENT)
    for i in range(c.depth):
        m.update(_block_map(f"trunk.blocks.{i}", f"trunk/blocks_{i}", mlp=c.mlp, norm=c.norm, qk_norm=c.qk_norm,
                            layerscale=c.layerscale is not None, text=False))
    d = c.decoder
    if d.depth:
        m.update({
            "pixel_decoder.proj_in.weight": ("pixel_decoder/proj_in/kernel", CONV1X1),
            "pixel_decoder.proj_in.bias": ("pixel_decoder/proj_in/bias", IDENT),
            "pixel_decoder.norm.weight": ("pixel_decoder/norm/scale", IDENT),
            "pixel_decoder.proj_out.weight": ("pixel_decoder/proj_out/kernel", CONV1X1),
            "pixel_decoder.proj_out.bias": ("pixel_decoder/proj_out/bias", IDENT),
        })
        if d.norm == "layernorm":
            m["pixel_decoder.norm.bias"] = ("pixel_decoder/norm/bias", IDENT)
        for i in range(d.depth):
            m.update(_block_map(f"pixel_decoder.blocks.{i}", f"pixel_decoder/blocks_{i}", mlp=d.mlp, norm=d.norm,
                                qk_norm=d.qk_norm, layerscale=d.layerscale is not None, text=False))
    t = c.text
    if t.depth:
        m.update({
            "token_embedding.weight": ("text/token_embedding", IDENT),
            "positional_embedding": ("text/positional_embedding", IDENT),
            "ln_final.weight": ("text/ln_final/scale", IDENT),
            "ln_final.bias": ("text/ln_final/bias", IDENT),
            "text_projection": ("text/text_projection", IDENT),  # stored (width, out) already
            "visual_proj.weight": ("visual_proj/kernel", LINEAR),
            "logit_scale": ("text/logit_scale", SCALAR),
        })
        for i in range(t.depth):
            m.update(_block_map(f"text_transformer.resblocks.{i}", f"text/blocks_{i}", mlp="gelu", norm="layernorm",
                                qk_norm=False, layerscale=False, text=True))
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


def _unrolled(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`c` with unrolled block stacks: the layout the release's per-block tensor names map onto."""
    c = c.copy_and_resolve_references()
    c.scan_layers = False
    return c


def convert(tensors: dict[str, np.ndarray], c: ml_collections.ConfigDict):
    """Release tensors -> our unboxed float32 params in the layout `c` asks for (stacked blocks
    with c.scan_layers), or one CheckpointError naming every bad key."""
    mapping = key_map(c)
    buffers = _rope_buffers(c)
    shapes = vtp_lib.param_shapes(_unrolled(c))
    flat_shapes = {"/".join(k): v.shape for k, v in _flatten(shapes).items()}
    missing = sorted(k for k in mapping if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in mapping and k not in buffers)
    problems = []
    flat = {}
    for k, (path, layout) in mapping.items():
        if k not in tensors:
            continue
        want = flat_shapes[path]
        expected = to_release(layout, np.broadcast_to(np.float32(0), want)).shape  # shape only: nothing allocated
        got = tuple(tensors[k].shape)
        # The release shape is checked before any transpose: a transposed Linear whose shape
        # happens to equal ours must be reported, not taken as is.
        if got != expected and not (layout == SCALAR and int(np.prod(got)) == 1):
            problems.append(f"{k}: shape {got}, expected {expected} (for {path} {want})")
            continue
        flat[path] = to_ours(layout, np.asarray(tensors[k], np.float32), want)
    for k, want in buffers.items():
        if k not in tensors:
            continue
        got = np.asarray(tensors[k])
        if got.shape != want.shape:  # the head dim (width / heads) the weights were made with differs
            tower, part = ("vision", c) if k.startswith("trunk") else ("decoder", c.decoder)
            made = f"head dim {4 * got.size}" if got.ndim == 1 else "another head dim"
            problems.append(f"{k}: shape {got.shape}, expected {want.shape} for head dim "
                            f"{part.width // part.num_heads} ({tower}_embed_dim={part.width} / {tower}_num_heads="
                            f"{part.num_heads}): the weights were made with {made}; check {tower}_num_heads")
        elif not np.allclose(got, want, rtol=1e-2):
            problems.append(f"{k}: RoPE periods {got.ravel()[:4]}... differ from the "
                            f"configured rope_base={c.rope_base} ({want[:4]}...)")
    if missing or unexpected or problems:
        lines = [f"missing key: {k}" for k in missing] + [f"unexpected key: {k}" for k in unexpected] + problems
        raise CheckpointError(f"checkpoint does not match its config ({len(lines)} problem(s)):\n  "
                              + "\n  ".join(lines))
    assert set(flat) == set(flat_shapes), sorted(set(flat_shapes) ^ set(flat))
    params = _unflatten(flat)
    return layers_lib.stack_blocks(params) if c.scan_layers else params


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


def read_release_config(path: str) -> ml_collections.ConfigDict:
    """Our model config from a release's config.json; invalid JSON or mistyped fields: one
    CheckpointError naming the file (and every such field)."""
    try:
        rc = json.loads(paths.read_text(path))
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    return config_from_release(rc, path)


def load_release(folder: str, scan_layers: bool = False, allow_nonfinite: bool = False):
    """(model config, params) from a release folder; with `scan_layers` the config says so and
    each block stack's params are stacked (<tower>/blocks/..., leading depth axis). `folder` is a
    local or gs:// folder or a Hugging Face hub id ("MiniMaxAI/VTP-Large-f16d64"). Weights with
    NaN or inf are rejected (naming the tensors) unless `allow_nonfinite`: a model that silently
    computes NaN is worse than none."""
    folder = hub.resolve(folder)
    cfg_path, st_path = paths.join(folder, "config.json"), paths.join(folder, "model.safetensors")
    for p in (cfg_path, st_path):
        if not paths.exists(p):
            raise FileNotFoundError(f"{p} not found: a released VTP folder holds config.json and model.safetensors")
    c = read_release_config(cfg_path)
    c.scan_layers = scan_layers
    try:
        tensors = files.read_safetensors(st_path, float_dtype=np.float32)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    try:
        params = convert(tensors, c)
    except CheckpointError as e:
        raise CheckpointError(f"{st_path}: {e}") from None
    if not allow_nonfinite:
        check_finite(tensors, st_path, "allow_nonfinite=True loads them anyway")
    return c, jax.tree.map(np.asarray, params)


def config_to_release(c: ml_collections.ConfigDict, image_size: int = 256) -> dict:
    """The official config.json fields describing our model config `c`."""
    if c.n_registers:
        raise CheckpointError("the release format has no register tokens (model.n_registers > 0)")
    inv_ffn = {v: k for k, v in _FFN.items()}
    rc = dict(model_type="vtp", image_size=image_size, train_clip=bool(c.text.depth),
              train_reconstruction=bool(c.decoder.depth), vision_patch_size=c.patch_size,
              vision_embed_dim=c.width, vision_depth=c.depth, vision_num_heads=c.num_heads,
              vision_mlp_ratio=c.mlp_ratio, vision_ffn_layer=inv_ffn[c.mlp], vision_norm_layer=c.norm,
              vision_init_values=c.layerscale, vision_use_qk_norm=c.qk_norm, vision_feature_bottleneck=c.latent_dim,
              vision_clip_feat=c.clip_feat, **_FIXED)
    if c.decoder.depth:
        d = c.decoder
        rc.update(decoder_embed_dim=d.width, decoder_depth=d.depth, decoder_num_heads=d.num_heads,
                  decoder_ffn_layer=inv_ffn[d.mlp], decoder_norm_layer=d.norm, decoder_init_values=d.layerscale,
                  decoder_use_qk_norm=d.qk_norm)
    if c.text.depth:
        t = c.text
        if c.clip_dim != t.width:
            raise CheckpointError(f"the release projects CLIP to text width: clip_dim={c.clip_dim} != {t.width}")
        rc.update(text_embed_dim=t.width, text_depth=t.depth, text_num_heads=t.num_heads, text_mlp_ratio=t.mlp_ratio,
                  text_vocab_size=t.vocab_size, text_context_length=t.context_length,
                  init_logit_scale=c.init_logit_scale)
    return rc


def export_release(c: ml_collections.ConfigDict, params, folder: str, image_size: int = 256):
    """Writes our params (in the layout c.scan_layers says) as a release folder (config.json +
    float32 model.safetensors) that `load_pretrained` and the official PyTorch code both open.
    Parts the release has no place for (the DINO head) are left out."""
    import safetensors.numpy

    rc = config_to_release(c, image_size)
    if c.scan_layers:
        params = layers_lib.unstack_blocks(jax.device_get(params))
    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in _flatten(jax.device_get(params)).items()}
    tensors = {k: np.ascontiguousarray(to_release(layout, flat[path])) for k, (path, layout) in key_map(c).items()}
    tensors.update({k: np.ascontiguousarray(v) for k, v in _rope_buffers(c).items()})
    paths.write_bytes(paths.join(folder, "model.safetensors"), safetensors.numpy.save(tensors))
    paths.write_json(paths.join(folder, "config.json"), rc, indent=1)
