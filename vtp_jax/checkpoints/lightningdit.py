"""Import official LightningDiT checkpoints (hustvl/LightningDiT and the fork VTP uses) into JAX.

The architecture is read from the tensors themselves (the head count, which the weights do not
hold, from the RoPE buffer, the argument or the size table). Every tensor is mapped with an
explicit, invertible layout: Linear (out, in) -> (in, out), Conv2d OIHW -> HWIO, fused qkv rows
[q | k | v] per head, and the SwiGLU's fused `w12` split into our w1 (first half, through
SiLU) and w2. Non-learned buffers (pos_embed, the RoPE tables) are checked against ours instead
of loaded. Anything missing, unexpected, mis-shaped or different is reported in one error.
No torch is needed: .pt files are read by the checked reader of vtp_jax.data.files.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vtp_jax import sampling
from vtp_jax.data import files
from vtp_jax.checkpoints.released import (CONV, FLAT, IDENT, LINEAR, LINEAR_OUT2, CheckpointError, _flatten,
                                          _unflatten, to_ours, to_release)
from vtp_jax.models import dit as dit_lib
from vtp_jax.models.layers import interleaved_rope_tables, stack_blocks, unstack_blocks

# Head counts by width: the official model names (B, L, XL, 1p0B, 1p6B) and our tiny size.
HEADS_BY_WIDTH = {width: heads for _, width, heads in dit_lib.DIT_SIZES.values()} | {1536: 24, 1792: 28}
DDP_PREFIX = "module."


# --------------------------------------------------------------------------------------------
# Architecture from tensors.
# --------------------------------------------------------------------------------------------
def _mlp_ratio(width: int, hidden: int) -> float:
    """A ratio r with int(2/3 * int(r * width)) == hidden (4.0 for every official model)."""
    if dit_lib.swiglu_hidden(width, 4.0) == hidden:
        return 4.0
    m = max(int(1.5 * hidden) - 2, 1)
    while int(2 / 3 * m) < hidden:
        m += 1
    ratio = m / width
    if int(width * ratio) < m:  # m / width * width rounded below m
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def infer_hparams(sd: Mapping[str, np.ndarray], num_heads: int | None = None) -> dict:
    """LightningDiT fields (see models.dit.LightningDiT) read from an official state dict."""
    anchors = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
               "final_layer.linear.weight", "blocks.0.mlp.w12.weight")
    absent = [k for k in anchors if k not in sd]
    if absent:
        raise CheckpointError(f"not a LightningDiT (SwiGLU) state dict: no {', '.join(absent)}; "
                              f"its first keys are {sorted(sd)[:6]}")
    width, channels, p, _ = sd["x_embedder.proj.weight"].shape
    tokens = sd["pos_embed"].shape[-2]
    n = math.isqrt(tokens)
    if n * n != tokens:
        raise CheckpointError(f"pos_embed has {tokens} tokens: not a square grid")
    out_rows = sd["final_layer.linear.weight"].shape[0]
    if out_rows not in (p * p * channels, 2 * p * p * channels):
        raise CheckpointError(f"final_layer.linear.weight has {out_rows} rows: expected p*p*C = {p * p * channels} "
                              f"(or twice that with learn_sigma)")
    use_rope = "feat_rope.freqs_cos" in sd
    if num_heads is None:
        if use_rope:  # its tables are (tokens, head_dim)
            num_heads = width // sd["feat_rope.freqs_cos"].shape[-1]
        elif width in HEADS_BY_WIDTH:
            num_heads = HEADS_BY_WIDTH[width]
        else:
            raise CheckpointError(f"width {width} is not an official LightningDiT size ({sorted(HEADS_BY_WIDTH)}) "
                                  f"and the checkpoint has no RoPE tables: pass num_heads")
    if width % num_heads:
        raise CheckpointError(f"width {width} is not divisible by num_heads={num_heads}")
    return dict(
        input_size=n * p, patch_size=p, in_channels=channels, hidden_size=width,
        depth=1 + max(int(m.group(1)) for m in map(re.compile(r"blocks\.(\d+)\.").match, sd) if m),
        num_heads=num_heads, mlp_ratio=_mlp_ratio(width, sd["blocks.0.mlp.w12.weight"].shape[0] // 2),
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        qk_norm="blocks.0.attn.q_norm.weight" in sd, use_rope=use_rope,
        learn_sigma=out_rows == 2 * p * p * channels)


# --------------------------------------------------------------------------------------------
# Official key -> (our param paths, layout). A key with several paths is a fused torch tensor
# split into equal parts along its first (output) axis, each part mapped with the layout.
# --------------------------------------------------------------------------------------------
def key_map(hp: dict) -> dict[str, tuple[tuple[str, ...], Any]]:
    m = {
        "x_embedder.proj.weight": (("x_embedder/kernel",), CONV),
        "x_embedder.proj.bias": (("x_embedder/bias",), IDENT),
        "y_embedder.embedding_table.weight": (("y_embedder/embedding",), IDENT),
        "final_layer.norm_final.weight": (("final_layer/norm_final/scale",), IDENT),
        "final_layer.linear.weight": (("final_layer/linear/kernel",), LINEAR),  # rows (p, q, c): as unpatchify
        "final_layer.linear.bias": (("final_layer/linear/bias",), IDENT),
        "final_layer.adaLN_modulation.1.weight": (("final_layer/adaLN_modulation/kernel",), LINEAR),
        "final_layer.adaLN_modulation.1.bias": (("final_layer/adaLN_modulation/bias",), IDENT),
    }
    for torch_name, ours in (("0", "fc1"), ("2", "fc2")):
        m[f"t_embedder.mlp.{torch_name}.weight"] = ((f"t_embedder/{ours}/kernel",), LINEAR)
        m[f"t_embedder.mlp.{torch_name}.bias"] = ((f"t_embedder/{ours}/bias",), IDENT)
    for i in range(hp["depth"]):
        t, o = f"blocks.{i}", f"blocks_{i}"
        m.update({
            f"{t}.norm1.weight": ((f"{o}/norm1/scale",), IDENT),
            f"{t}.norm2.weight": ((f"{o}/norm2/scale",), IDENT),
            f"{t}.attn.qkv.weight": ((f"{o}/attn/qkv/kernel",), LINEAR),  # rows [q | k | v], head-major
            f"{t}.attn.qkv.bias": ((f"{o}/attn/qkv/bias",), FLAT),
            f"{t}.attn.proj.weight": ((f"{o}/attn/proj/kernel",), LINEAR_OUT2),
            f"{t}.attn.proj.bias": ((f"{o}/attn/proj/bias",), IDENT),
            f"{t}.mlp.w12.weight": ((f"{o}/mlp/w1/kernel", f"{o}/mlp/w2/kernel"), LINEAR),
            f"{t}.mlp.w12.bias": ((f"{o}/mlp/w1/bias", f"{o}/mlp/w2/bias"), IDENT),
            f"{t}.mlp.w3.weight": ((f"{o}/mlp/w3/kernel",), LINEAR),
            f"{t}.mlp.w3.bias": ((f"{o}/mlp/w3/bias",), IDENT),
            f"{t}.adaLN_modulation.1.weight": ((f"{o}/adaLN_modulation/kernel",), LINEAR),
            f"{t}.adaLN_modulation.1.bias": ((f"{o}/adaLN_modulation/bias",), IDENT),
        })
        if hp["qk_norm"]:
            m[f"{t}.attn.q_norm.weight"] = ((f"{o}/attn/q_norm/scale",), IDENT)
            m[f"{t}.attn.k_norm.weight"] = ((f"{o}/attn/k_norm/scale",), IDENT)
    return m


def buffers(hp: dict) -> dict[str, np.ndarray]:
    """The official non-learned tensors, from our own tables."""
    n = hp["input_size"] // hp["patch_size"]
    out = {"pos_embed": dit_lib.sincos_pos_embed(n, n, hp["hidden_size"])[None]}
    if hp["use_rope"]:
        sin, cos = interleaved_rope_tables(n, n, hp["hidden_size"] // hp["num_heads"])
        out["feat_rope.freqs_cos"], out["feat_rope.freqs_sin"] = cos, sin
    return out


BUFFER_ATOL = 1e-4  # float32 tables recomputed in another library; a wrong layout differs by O(1)


def from_state_dict(sd: Mapping[str, Any], num_heads: int | None = None, scan_layers: bool = False):
    """(LightningDiT fields, unboxed float32 params) from an official state dict of arrays; with
    `scan_layers` the fields say so and the block params are stacked (blocks/..., leading depth)."""
    sd = {(k[len(DDP_PREFIX):] if k.startswith(DDP_PREFIX) else k): np.asarray(v) for k, v in sd.items()}
    hp = infer_hparams(sd, num_heads)
    shapes = {"/".join(k): v.shape for k, v in _flatten(dit_lib.param_shapes(dit_lib.LightningDiT(**hp))).items()}
    mapping, reference = key_map(hp), buffers(hp)
    missing = sorted(k for k in list(mapping) + list(reference) if k not in sd)
    unexpected = sorted(k for k in sd if k not in mapping and k not in reference)
    problems, flat = [], {}
    for k, (paths, layout) in mapping.items():
        if k not in sd:
            continue
        a = np.asarray(sd[k], np.float32)
        wants = [shapes[p] for p in paths]
        part = to_release(layout, np.empty(wants[0])).shape  # the official shape, checked before any reshape
        expected = (len(paths) * part[0],) + part[1:]
        if a.shape != expected:
            problems.append(f"{k}: shape {tuple(a.shape)}, expected {expected} (for {', '.join(paths)})")
            continue
        flat.update((p, to_ours(layout, x, w)) for p, x, w in zip(paths, np.split(a, len(paths)), wants))
    for k, want in reference.items():
        if k in sd:
            got = np.asarray(sd[k], np.float32)
            if got.shape != want.shape:
                problems.append(f"{k}: shape {got.shape}, expected {want.shape}")
            elif not np.allclose(got, want, rtol=0, atol=BUFFER_ATOL):
                problems.append(f"{k}: differs from LightningDiT's table by up to {np.abs(got - want).max():.3g} "
                                f"(num_heads={hp['num_heads']}, grid {hp['input_size'] // hp['patch_size']})")
    if missing or unexpected or problems:
        lines = [f"missing key: {k}" for k in missing] + [f"unexpected key: {k}" for k in unexpected] + problems
        raise CheckpointError(f"LightningDiT state dict does not match the architecture it implies "
                              f"({hp}; {len(lines)} problem(s)):\n  " + "\n  ".join(lines))
    assert set(flat) == set(shapes), sorted(set(shapes) ^ set(flat))
    if scan_layers:
        return {**hp, "scan_layers": True}, stack_blocks(_unflatten(flat))
    return hp, _unflatten(flat)


def to_state_dict(hp: dict, params) -> dict[str, np.ndarray]:
    """Our params (stacked if hp says scan_layers) as an official state dict (float32 NumPy),
    buffers included."""
    if hp.get("scan_layers"):
        params = unstack_blocks(jax.device_get(params))
    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in _flatten(jax.device_get(params)).items()}
    out = {}
    for k, (paths, layout) in key_map(hp).items():
        out[k] = np.concatenate([to_release(layout, flat[p]) for p in paths], axis=0)
    out.update(buffers(hp))
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def read_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
    """The float32 state dict of a LightningDiT .pt file (its `ema` entry, else `model`, else the
    file), read without torch by the checked reader (`vtp_jax.data.files`): no pickle code runs."""
    try:
        ckpt = files.read_torch_file(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    sd = ckpt.get("ema", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict or a dict with 'ema' / 'model', "
                              f"got {type(ckpt).__name__}")
    return {k: v.astype(np.float32) for k, v in sd.items() if isinstance(v, np.ndarray)}


# --------------------------------------------------------------------------------------------
# The loaded model.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PretrainedDiT:
    """LightningDiT fields + float32 params, as jitted velocity and sampling functions.

    Latents are NHWC float32 (B, H, W, C) on any grid (input_size is the one the checkpoint's
    buffers were made for); t in [0, 1] with t = 0 noise and t = 1 data; labels int (B,),
    `num_classes` being the null (unconditional) class.
    """

    config: dict
    params: Any
    _fns: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def model(self) -> dit_lib.LightningDiT:
        return dit_lib.LightningDiT(**self.config)

    def _velocity(self, params, x, t, y):
        return self.model.apply({"params": params}, x, t, y)[..., : self.config["in_channels"]]

    def velocity(self, x, t, y) -> jax.Array:
        """(B, h, w, C) velocity at (x, t, y) (the velocity channels only, if learn_sigma)."""
        if "velocity" not in self._fns:
            self._fns["velocity"] = jax.jit(self._velocity)
        return self._fns["velocity"](self.params, jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32),
                                     jnp.asarray(y, jnp.int32))

    def sample(self, noise, y, num_steps: int, shift: float = 0.0, method: str = "euler", cfg_scale: float = 1.0,
               cfg_interval_start: float = 0.0, atol: float = 1e-6, rtol: float = 1e-3,
               cfg_channels: int | None = None) -> jax.Array:
        """Integrates the ODE from `noise` (t = 0) to data (t = 1) on the official grid (see
        vtp_jax.sampling: num_steps grid points; shift <= 0 is no shift), with classifier-free
        guidance when cfg_scale != 1 (not below cfg_interval_start; on all channels, or on the
        first `cfg_channels` with the rest conditional: 3 reproduces the official sampler)."""
        guided = float(cfg_scale) != 1.0
        channels = None if cfg_channels is None else int(cfg_channels)
        key = ("sample", int(num_steps), float(shift), method, guided, float(atol), float(rtol), channels)
        if key not in self._fns:
            def fn(params, noise, y, scale, start):
                v = lambda x, t, labels: self._velocity(params, x, t, labels)  # noqa: E731
                if guided:
                    null = self.config["num_classes"]
                    field = lambda x, t: sampling.guided_velocity(  # noqa: E731
                        v, x, t, y, null, scale, start, channels)
                else:
                    field = lambda x, t: v(x, t, y)  # noqa: E731
                return sampling.ode_sample(field, noise, int(num_steps), method, float(shift), atol, rtol)
            self._fns[key] = jax.jit(fn)
        return self._fns[key](self.params, jnp.asarray(noise, jnp.float32), jnp.asarray(y, jnp.int32),
                              jnp.float32(cfg_scale), jnp.float32(cfg_interval_start))


def load_lightningdit(checkpoint: str | Mapping[str, Any], num_heads: int | None = None,
                      scan_layers: bool = False) -> PretrainedDiT:
    """A LightningDiT `.pt` checkpoint (torch.save's zip format; torch is not needed), or an official
    state dict of arrays."""
    sd = read_torch_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    config, params = from_state_dict(sd, num_heads, scan_layers)
    return PretrainedDiT(config, jax.device_put(params))
