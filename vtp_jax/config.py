"""The one config schema of vtp-jax.

Every field a job reads is declared here with its default and a comment; `configs/*.py` only
override values. `check_fields` rejects a config with fields this schema does not know, so a typo
in a `--config.x=y` override fails at start-up instead of being silently ignored.

Sections:
  model   architecture (vision trunk, bottleneck, pixel decoder, text tower, CLIP, DINO head).
  data    the grain pipeline (`vtp_jax.data.pipeline.default_config`).
"""
from __future__ import annotations

import ml_collections

# Released VTP trunk sizes (released_vtp.md): width, depth, heads. Head dim is 64 in all.
VIT_SIZES = {
    "S": dict(width=384, depth=12, num_heads=6),
    "B": dict(width=768, depth=12, num_heads=12),
    "L": dict(width=1024, depth=24, num_heads=16),
}


def model_config() -> ml_collections.ConfigDict:
    """Architecture fields. Defaults are VTP-B as released."""
    c = ml_collections.ConfigDict()
    c.patch_size = 16
    # Vision trunk (DINOv3-style ViT).
    c.width = 768
    c.depth = 12
    c.num_heads = 12
    c.mlp = "swiglu"  # 'swiglu' (released) or 'gelu' (plain ViT MLP).
    c.mlp_ratio = 4.0  # SwiGLU hidden = int(width * ratio * 2/3) rounded up to a multiple of 8.
    c.norm = "rmsnorm"  # 'rmsnorm' (eps 1e-5, released trunk) or 'layernorm' (eps 1e-6).
    c.qk_norm = False  # RMSNorm on q and k per head; the paper's variant, off in released weights.
    c.layerscale = ml_collections.FieldReference(None, field_type=float)  # init value or None.
    c.n_registers = 0  # register ("storage") tokens after cls.
    c.rope_base = 100.0
    # Run the RoPE chain (tables and rotation) with bfloat16 rounding after every op, as the
    # release does even in float32. Needed for 1e-5 parity with released checkpoints.
    c.rope_bf16 = True
    # Bottleneck: Dense(width -> latent_dim, no bias) on the normed patch tokens.
    c.latent_dim = 64
    # Pixel decoder (released: symmetric to the trunk; the paper's scaling runs: 4 blocks).
    c.decoder = ml_collections.ConfigDict()
    c.decoder.width = 768
    c.decoder.depth = 12
    c.decoder.num_heads = 12
    c.decoder.mlp = "swiglu"
    c.decoder.mlp_ratio = 4.0
    c.decoder.norm = "layernorm"
    c.decoder.qk_norm = False
    c.decoder.layerscale = ml_collections.FieldReference(None, field_type=float)
    # Text tower (OpenCLIP style). depth = 0 removes it (reconstruction-only models).
    c.text = ml_collections.ConfigDict()
    c.text.width = 768
    c.text.depth = 12
    c.text.num_heads = 12
    c.text.mlp_ratio = 4.0
    c.text.vocab_size = 49408
    c.text.context_length = 77
    # CLIP: projection of the trunk's cls token ('cls') or mean patch token ('pooled').
    c.clip_dim = 768
    c.clip_feat = "cls"
    c.init_logit_scale = 2.659260036932778  # log(1 / 0.07), OpenCLIP.
    # DINO / iBOT head (not released; DINOv2 defaults). prototypes = 0 removes the head.
    c.head = ml_collections.ConfigDict()
    c.head.hidden_dim = 2048
    c.head.bottleneck_dim = 256
    c.head.n_layers = 3
    c.head.prototypes = 65536
    # Numerics and memory.
    c.dtype = "float32"  # compute dtype ('bfloat16' for training at scale); params stay float32.
    c.remat = "none"  # 'none' | 'full' | 'dots' (save matmul outputs) per block.
    c.attention = "xla"  # implementation for jax.nn.dot_product_attention: 'xla' | 'cudnn'.
    return c


def with_size(c: ml_collections.ConfigDict, size: str, decoder_depth: int | None = None):
    """Sets trunk and decoder to a released size (decoder symmetric unless decoder_depth)."""
    s = VIT_SIZES[size]
    c.width, c.depth, c.num_heads = s["width"], s["depth"], s["num_heads"]
    c.decoder.width, c.decoder.num_heads = s["width"], s["num_heads"]
    c.decoder.depth = s["depth"] if decoder_depth is None else decoder_depth
    return c


def check_fields(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, where="config"):
    """Raises one ValueError naming every field of `config` that `schema` does not declare."""
    unknown = []

    def walk(c, s, prefix):
        for k in c.keys():
            if k not in s:
                unknown.append(prefix + k)
            elif isinstance(c[k], ml_collections.ConfigDict) and isinstance(s[k], ml_collections.ConfigDict):
                walk(c[k], s[k], prefix + k + ".")

    walk(config, schema, "")
    if unknown:
        raise ValueError(f"unknown {where} field(s): {', '.join(sorted(unknown))}")


def default_config() -> ml_collections.ConfigDict:
    """Every field any job reads, with defaults; configs/*.py start from this and override."""
    c = ml_collections.ConfigDict()
    c.model = model_config()
    c.seed = 0
    return c
