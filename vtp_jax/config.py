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
    # release's inference code does even in float32: an inference quirk needed for 1e-5 parity
    # with released checkpoints, which `load_pretrained` switches on. Training computes it in f32.
    c.rope_bf16 = False
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
    c.head.use_bn = False  # DINO's option: BatchNorm in the head's MLP (configs/demo.py says why)
    c.head.prototypes = 65536
    # Numerics and memory.
    c.dtype = "float32"  # compute dtype ('bfloat16' for training at scale); params stay float32.
    c.remat = "none"  # 'none' | 'full' | 'dots' (save matmul outputs) per block.
    c.attention = "xla"  # implementation for jax.nn.dot_product_attention: 'xla' | 'cudnn'.
    # Run each block stack (trunk, pixel decoder, text tower) as one nn.scan: parameters stacked as
    # <tower>/blocks/... on a leading 'layers' axis instead of blocks_0 .. blocks_{depth-1}; compile
    # time stops growing with depth. Released folders import into either layout.
    c.scan_layers = False
    return c


def with_size(c: ml_collections.ConfigDict, size: str, decoder_depth: int | None = None):
    """Sets trunk and decoder to a released size (decoder symmetric unless decoder_depth)."""
    s = VIT_SIZES[size]
    c.width, c.depth, c.num_heads = s["width"], s["depth"], s["num_heads"]
    c.decoder.width, c.decoder.num_heads = s["width"], s["num_heads"]
    c.decoder.depth = s["depth"] if decoder_depth is None else decoder_depth
    return c


def evaluator(kind: str, **fields) -> ml_collections.ConfigDict:
    """An entry of `config.evals`: `fields` over every default of evaluator type `kind`, so that any
    of its fields can be overridden from the command line (--config.evals.<name>.<field>=...)."""
    from vtp_jax.evals import evaluator as evaluator_lib  # its defaults live with the evaluators

    return evaluator_lib.entry(ml_collections.ConfigDict(dict(type=kind, **fields)))


def check_fields(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, where="config"):
    """Raises one ValueError naming every field of `config` that `schema` does not declare.
    `evals` entries are free-form here: each evaluator checks its own fields."""
    unknown = []

    def walk(c, s, prefix):
        for k in c.keys():
            if k == "evals":
                continue
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
    c.init_from = ""  # a release-format folder (or, for stage 2, a stage-1 workdir) to start from.
    c.eval_at_start = False  # also run config.evals before the first step (e.g. stage 2's "before")
    # Pre-training: each step's batches as accum_steps micro-batches (a lax.scan): the same update
    # as one step on the whole batch with ~1 / accum_steps of the activations (configs/vtp_l.py:
    # settings for B_clip = 16k). It must divide B_clip, B_ssl and B_rec per batch shard. CLIP
    # works from cached embeddings (one extra gradient-free forward); the teacher's targets,
    # Sinkhorn-Knopp sums and the centers are over the whole batch. KoLeo and the head's BatchNorm
    # (model.head.use_bn) are over the WHOLE batch too, as at accum_steps = 1: both couple rows
    # across the batch, so per micro-batch they would be other losses (KoLeo's nearest neighbours
    # among B / k rows lie farther: another value and gradient; BatchNorm statistics of a few rows
    # are noise), and raising accum_steps to fit memory must not change what is trained. Their
    # cost: a gradient-free student forward of the global crops (KoLeo's cls tokens); with use_bn,
    # of every SSL crop, and the head then runs on the whole batch (its activations do not shrink;
    # the paper recipe has no BatchNorm). Stochastic depth draws its subsets per micro-batch: only
    # with drop_path_* = 0 is the step identical to accum_steps = 1.
    c.accum_steps = 1
    return c


def eval_config() -> ml_collections.ConfigDict:
    """The standalone evaluation job (`job='eval'`): what to evaluate; `evals` says how."""
    c = ml_collections.ConfigDict()
    c.checkpoint = ""  # a release-format folder (e.g. a run's export/) or a training workdir
    return c


def latents_config() -> ml_collections.ConfigDict:
    """Cached tokenizer latents for the DiT (`job='extract_latents'`, or the DiT job when
    dit.latents is empty): what to encode with which tokenizer, and how to store it."""
    from vtp_jax.evals import evaluator

    c = ml_collections.ConfigDict()
    c.tokenizer = ""  # a release-format folder (a run's export/, a released VTP) or a training workdir
    c.data = evaluator.data_config()  # its TRAIN split is encoded (train_split / train_paths / num_train_images)
    c.data.num_train_images = 0  # 0: all (the procedural set needs a number)
    c.part_batches = 50  # global batches per output file: the unit of resumption
    c.stats_samples = 10_000  # per-channel mean / std from this many random unflipped latents (LightningDiT)
    c.dtype = "float16"  # storage; latents of the released models have std 0.06-0.2, far from fp16's limits
    return c


def dit_config() -> ml_collections.ConfigDict:
    """The LightningDiT job: model, flow recipe, latents and sampling (VTP's XL/1 settings)."""
    c = ml_collections.ConfigDict()
    c.size = "XL"  # vtp_jax.models.dit.DIT_SIZES: tiny, B, L, XL (depth, width, heads)
    c.patch_size = 1
    c.mlp_ratio = 4.0
    c.class_dropout_prob = 0.1  # CFG label dropout
    c.qk_norm = False
    c.use_rope = True
    c.dtype = "float32"  # compute; 'bfloat16' as LightningDiT's autocast
    c.remat = "none"
    c.scan_layers = False  # the blocks as one nn.scan (LightningDiT.scan_layers): params stacked as blocks/...
    c.batch_size = 1024  # global (LightningDiT: 1024)
    c.ema_decay = 0.9999  # the EMA pytree, updated every step; sampled and evaluated
    c.t_mu, c.t_sigma = -0.75, 1.0  # logit-normal t (VTP-L; S / B: -0.5, 1.25)
    c.latents = ""  # folder of extract_latents (shards, stats.npz, meta.json); '' = extract `latents` first
    c.latent_multiplier = 1.0  # (z - mean) / std * multiplier
    c.tokenizer = ""  # decodes samples; '' = the tokenizer the latents were extracted with
    c.sample = ml_collections.ConfigDict()
    c.sample.num_steps = 250  # grid points (LightningDiT: 250 = 249 Euler steps)
    c.sample.shift = 0.075  # VTP's time shift (LightningDiT's own: 0.3; <= 0: none)
    c.sample.method = "euler"  # 'euler' | 'heun' | 'dopri5'
    c.sample.cfg_scale = 1.0  # VTP's headline numbers use no guidance
    c.sample.cfg_interval_start = 0.0
    c.sample.every = 5_000  # steps between sample grids (W/samples/<step>.png and TensorBoard)
    c.sample.classes = 8  # grid rows: this many classes ...
    c.sample.per_class = 8  # ... times this many samples
    return c


def stage2_config() -> ml_collections.ConfigDict:
    """Stage 2: the frozen tokenizer's pixel decoder fine-tuned with a GAN (taming / LDM recipe;
    the paper gives no settings). The tokenizer comes from train.init_from."""
    c = ml_collections.ConfigDict()
    # Generator: L1 + LPIPS (on [-1, 1] pixels) + adaptive weight x disc_weight x GAN term.
    c.l1_weight = 1.0
    c.lpips_weight = 1.0
    c.lpips_params = ""  # `python -m vtp_jax.checkpoints.torch_convert lpips` output
    c.gan_loss = "hinge"  # 'hinge' | 'non_saturating'
    c.disc_weight = 0.5
    c.disc_start = 0  # steps before the GAN term (and the discriminator's updates) start
    c.max_adaptive_weight = 1e4  # cap of ||grad_last(nll)|| / ||grad_last(g)||
    # Discriminator: PatchGAN (ndf 64, 3 layers; GroupNorm instead of taming's BatchNorm).
    c.disc_ndf = 64
    c.disc_layers = 3
    c.disc_norm = "group"
    c.disc_lr = 1e-4
    c.disc_b1, c.disc_b2 = 0.5, 0.9  # taming
    c.regularizer = "none"  # 'none' | 'lecam' (Tseng et al. 2021) | 'r1' (Mescheder et al. 2018)
    c.lecam_weight = 0.001
    c.lecam_ema = 0.99
    c.r1_gamma = 1.0
    return c


def study_config() -> ml_collections.ConfigDict:
    """The miniature study (`vtp_jax.study`): which tokenizers, the job templates every run
    derives from (a pretrain and a dit config), the evaluators, the domain classifier."""
    c = ml_collections.ConfigDict()
    c.variants = ("ae", "clip_ae", "ssl_ae", "vtp")
    c.seeds = (0, 1)
    c.tokenizer = default_config("pretrain")  # each variant sets objectives.l_clip / l_ssl and the seed
    c.dit = default_config("dit")  # latents.tokenizer and the seed are set per run
    c.evals = ml_collections.ConfigDict()  # run on every tokenizer (job 'eval')
    c.classifier = ml_collections.ConfigDict()
    c.classifier.seed = 100  # procedural streams 100 (train) and 101 (validation): unseen elsewhere
    c.classifier.num_train, c.classifier.num_val = 8192, 2048
    c.classifier.image_size = 64  # rendered at the tokenizers' size (the network's stem strides to 32)
    c.classifier.width = 16
    c.classifier.steps, c.classifier.batch_size, c.classifier.lr = 600, 64, 3e-3  # ~98% top-1, ~2.5 CPU-min
    return c


JOB_SECTIONS = {
    "pretrain": ("model", "data", "objectives", "optim"),
    "eval": ("eval",),
    "extract_latents": ("latents",),
    "dit": ("dit", "latents", "optim"),
    "stage2": ("data", "stage2", "optim"),
    "study": ("study",),
}


def default_config(job: str = "pretrain") -> ml_collections.ConfigDict:
    """Every field `job` reads, with defaults; configs/*.py start from this and override.

    Shared by every job: `job`, `seed`, `train` (the runner) and `evals` (evaluators by name, each
    a dict with a `type` from `vtp_jax.evals` and that evaluator's fields)."""
    from vtp_jax.data import pipeline  # local: the data module imports config helpers

    if job not in JOB_SECTIONS:
        raise ValueError(f"job={job!r}: expected one of {sorted(JOB_SECTIONS)}")
    c = ml_collections.ConfigDict()
    c.job = job
    c.seed = 0
    c.train = train_config()
    c.evals = ml_collections.ConfigDict()
    sections = JOB_SECTIONS[job]
    if "model" in sections:
        c.model = model_config()
    if "data" in sections:
        c.data = pipeline.data_config()
    if "model" in sections and "data" in sections:
        c.data.context_length = c.model.text.get_ref("context_length")  # one value for both
        c.data.patch_size = c.model.get_ref("patch_size")  # iBOT mask grid
    if "objectives" in sections:
        c.objectives = objectives_config()
    if "optim" in sections:
        c.optim = optim_config()
    if "eval" in sections:
        c.eval = eval_config()
    if "latents" in sections:
        c.latents = latents_config()
    if "dit" in sections:
        c.dit = dit_config()
    if "stage2" in sections:
        c.stage2 = stage2_config()
    if "study" in sections:
        c.study = study_config()
    return c


def paper_recipe(c: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
    """VTP pre-training at pod scale (paper where it speaks, DINOv2 / OpenCLIP where silent)."""
    with_size(c.model, size)
    c.model.dtype = "bfloat16"  # compute; params and optimizer state stay float32
    c.model.remat = "dots"
    c.model.scan_layers = True  # one compiled block per stack: VTP-L compiles in ~2 min, not ~14
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
