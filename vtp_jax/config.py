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


def objectives_config() -> ml_collections.ConfigDict:
    """Loss weights and the SSL recipe. DINOv2 / OpenCLIP defaults where the paper is silent."""
    c = ml_collections.ConfigDict()
    # L_total = l_rec * L_rec + l_ssl * L_ssl + l_clip * L_clip (paper: 0.1 / 1 / 1). A weight of 0
    # removes that objective's forward pass from the step.
    c.l_rec = 0.1
    c.l_ssl = 1.0
    c.l_clip = 1.0
    c.logit_scale_max = 4.605170185988092  # log(100): OpenCLIP clamps the scale at 100.
    # SSL (DINOv2): L_ssl = dino_weight * L_dino + ibot_weight * L_ibot + koleo_weight * L_koleo.
    c.dino_weight = 1.0
    c.ibot_weight = 1.0
    c.koleo_weight = 0.1
    c.student_temp = 0.1
    c.teacher_temp = 0.07
    c.warmup_teacher_temp = 0.04
    c.warmup_teacher_temp_steps = 0  # DINOv2: 30 epochs.
    c.centering = "centering"  # 'centering' (EMA center) or 'sinkhorn_knopp'.
    c.center_momentum = 0.9
    c.teacher_momentum = 0.992  # cosine to teacher_momentum_end over the run (DINOv2).
    c.teacher_momentum_end = 1.0
    c.freeze_last_layer_steps = 0  # DINOv2: the prototypes stay frozen for the first epoch.
    # Reconstruction: L_rec = l1_weight * L1 + lpips_weight * LPIPS(VGG16) in [-1, 1] pixels.
    c.l1_weight = 1.0
    c.lpips_weight = 1.0
    c.lpips_params = ""  # Flax LPIPS file from `python -m vtp_jax.checkpoints.torch_convert lpips`.
    # Batch-subset stochastic depth per pass (the teacher uses none).
    c.drop_path_clip = 0.0
    c.drop_path_ssl = 0.0
    c.drop_path_rec = 0.0
    return c


def optim_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.lr = 5e-4  # peak; warmup then cosine to min_lr.
    c.min_lr = 1e-6
    c.warmup_steps = 1000
    c.b1 = 0.9
    c.b2 = 0.98  # OpenCLIP's large-batch value (DINOv2: 0.999).
    c.eps = 1e-6
    c.weight_decay = 0.04  # cosine to weight_decay_end (DINOv2).
    c.weight_decay_end = 0.2
    c.clip_grad = 3.0  # global norm (DINOv2); 0 disables.
    c.layer_decay = 1.0  # DINOv2 uses 0.9; 1.0 is off.
    c.patch_embed_lr_mult = 1.0  # DINOv2 uses 0.2.
    return c


def train_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.steps = 100_000
    c.mesh = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices.
    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.images_every = 1000  # reconstructions written to TensorBoard and the workdir.
    c.max_nonfinite = 10  # abort after this many non-finite steps in a row (checked when logging).
    c.profile_steps = 0  # > 0: a profile of this many steps after warm-up (clu Profile).
    c.init_from = ""  # released VTP folder (load_pretrained) to fine-tune from.
    return c


def default_config() -> ml_collections.ConfigDict:
    """Every field any job reads, with defaults; configs/*.py start from this and override."""
    from vtp_jax.data import pipeline  # local: the data module imports config helpers

    c = ml_collections.ConfigDict()
    c.model = model_config()
    c.data = pipeline.data_config()
    c.data.context_length = c.model.text.get_ref("context_length")  # one value for both
    c.data.patch_size = c.model.get_ref("patch_size")  # iBOT mask grid
    c.objectives = objectives_config()
    c.optim = optim_config()
    c.train = train_config()
    c.seed = 0
    return c


def paper_recipe(c: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
    """VTP pre-training at pod scale (paper where it speaks, DINOv2 / OpenCLIP where silent)."""
    with_size(c.model, size)
    c.model.dtype = "bfloat16"  # compute; params and optimizer state stay float32
    c.model.remat = "dots"
    d = c.data  # paper: 256 px, B_clip 16k, B_ssl 4k, B_rec 2k (the data_config defaults)
    d.source = "array_record"
    d.paths = ""  # required: --config.data.paths='gs://.../*.array_record'
    d.num_workers = 8
    o = c.objectives  # paper: l_rec 0.1, l_ssl 1, l_clip 1 (the defaults)
    o.lpips_params = ""  # required with lpips_weight > 0 (README: LPIPS weights)
    o.warmup_teacher_temp_steps = 10_000  # DINOv2: 30 epochs of its schedule
    o.freeze_last_layer_steps = 1_250  # DINOv2: one epoch of 1250 iterations
    o.drop_path_ssl = 0.1  # DINOv2 ViT-L uses 0.3 at lower batch; not stated by VTP
    opt = c.optim
    opt.lr, opt.warmup_steps = 5e-4, 2_000  # OpenCLIP-style at 16k pairs per step
    opt.layer_decay = 0.9  # DINOv2
    opt.patch_embed_lr_mult = 0.2  # DINOv2
    t = c.train
    t.steps = 70_000  # ~1.1B samples at 16k per step (the paper's scaling runs)
    t.mesh = (-1, 8, 1)  # FSDP over 8 devices (one host), data parallel across hosts
    t.log_every, t.checkpoint_every, t.images_every = 100, 2_000, 2_000
    return c
