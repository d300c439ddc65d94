"""The config sections that several jobs share, and the check that rejects unknown fields.

Every field a job reads is declared with its default and a comment: here for the shared sections
(train, model, data, objectives, optim, latents, the evaluators' data), in the job's module for its
own (`vtp_jax.jobs`), in each evaluator's `defaults()` for its fields; a job's
`default_config()` puts them together; `configs/*.py` only override values. `check_fields` rejects
a config with fields its job's schema does not know, so a typo in a `--config.x=y` override fails
at start-up instead of being silently ignored.
"""
from __future__ import annotations

import numbers

import ml_collections

from vtp_jax import paths
from vtp_jax.data import procedural


class ConfigError(ValueError):
    """An impossible config, reported before anything compiles."""

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
    c.remat = "none"  # 'none' | 'full' | 'dots' (save matmul outputs) per block; 'auto': the compile plan picks.
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


def read_saved(path: str, schema: ml_collections.ConfigDict, fields) -> ml_collections.ConfigDict:
    """`schema` (today's fields and defaults, filled in place) with the values a run saved in `path`
    (a workdir's config.json) for the top-level `fields` (sections or values). Fields the schema no longer has
    are ignored (older runs); a file that is not a JSON object, a section that is not an object or
    a value of another type than the schema's is one ConfigError naming the file and every such field."""
    try:
        saved = paths.read_json(path)
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{path}: not a readable config.json ({type(e).__name__}: {e})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: expected a JSON object of config fields, got {type(saved).__name__}")
    c, bad = schema, []  # not a resolved copy: its typed None fields (FieldReference) keep their type

    def apply(node, values: dict, prefix: str):
        for k, v in values.items():
            if k not in node:
                continue
            if isinstance(node[k], ml_collections.ConfigDict):
                if isinstance(v, dict):
                    apply(node[k], v, f"{prefix}{k}.")
                else:
                    bad.append(f"{prefix}{k}={str(v)[:60]}: expected an object of fields")
                continue
            try:
                node[k] = v  # ml_collections checks the type (int -> float and list -> tuple allowed)
            except (TypeError, ValueError):
                bad.append(f"{prefix}{k}={str(v)[:60]!s}: expected {type(node[k]).__name__}")

    apply(c, {k: saved[k] for k in fields if k in saved}, "")
    if bad:
        raise ConfigError(f"{path}: {'; '.join(bad)}")
    return c


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
    # Multi-slice (TPU) or multi-host (GPU) runs: how many slices each mesh axis spans, so that only
    # those axes cross the slow data-centre network; (slices, 1, 1) is data parallel across slices.
    c.dcn_mesh = (1, 1, 1)
    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.images_every = 1000  # reconstructions written to TensorBoard and the workdir.
    c.max_nonfinite = 10  # abort after this many non-finite steps in a row (checked when logging).
    # The divergence guard: a checkpoint is written only when the steps since the previous one were
    # healthy: no update skipped as non-finite, every loss finite, |loss| <= divergence_factor x
    # the median |loss| of the last 100 steps of earlier healthy stretches (a run's first stretch:
    # x its first loss), and the largest parameter magnitude <= divergence_factor x that of the
    # last healthy state (a step's loss predates its update: this covers the last update). An
    # unhealthy stretch gets no checkpoint (a warning says so), so the newest checkpoint is always
    # a healthy one to resume from and rotation never removes it; a later healthy stretch (a
    # recovered spike) is saved again. A run whose last stretch is unhealthy exits with an error
    # and writes no export. 0 turns both bands off (the non-finite rules stay).
    c.divergence_factor = 10.0
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
    c.accum_steps = 1  # 0: auto, the smallest that fits the device's memory (train/aot.py)
    # Compile instead of run (train/aot.py): a TPU topology, as a Cloud accelerator type ("v5p-128",
    # "v5e-256", "v6e-256", "v4-64", "v5litepod-16") or a chip grid ("v5p:4x4x4"), for which the job
    # is built from shapes and AOT-compiled on this machine's CPU (`pip install -e ".[tpu]"`): per-chip
    # memory, FLOPs and collectives in W/compiled.json, exit 0 only when it fits. No data or weight
    # file is read or checked; nothing is allocated or run.
    c.compile_for = ""
    c.compile_slices = 1  # slices of that topology (multi-slice: with dcn_mesh, e.g. (2, 1, 1))
    # Fraction of a device's memory the compile plan leaves free (fragmentation, the runtime,
    # evaluators): a step fits when its compiled total is <= (1 - hbm_margin) x the device's memory.
    c.hbm_margin = 0.1
    return c


def data_config() -> ml_collections.ConfigDict:
    """config.data: every field the training pipeline (`vtp_jax.data.pipeline`) reads, with VTP's defaults (256 px, DataComp-scale
    batches) and DINOv2's augmentation defaults scaled from 224 to 256 px."""
    c = ml_collections.ConfigDict()
    # Source of records.
    c.source = "procedural"  # 'procedural' | 'array_record' | 'tfds'
    c.paths = ""  # array_record: shard glob, directory, or comma-separated list
    c.tfds_name = "imagenet2012"  # tfds: an array_record TFDS dataset with image + label
    c.tfds_split = "train"
    c.tfds_data_dir = ""  # '' = TFDS default
    c.procedural_size = 64  # procedural: rendered side (views resize it like any photo)
    c.procedural_seed = 0  # which procedural dataset (independent of the shuffle seed)
    c.procedural_records = 2 ** 31  # epoch length grain needs; the generator itself is unbounded
    c.procedural_objects = 2  # objects per scene at most (1: the label names the only object)
    c.procedural_sizes = ("small", "large")  # object sizes drawn (data/procedural.py SIZES)
    # Batches per step, global (each process takes 1/P). VTP: 16k pairs, 4k SSL, 2k reconstruction.
    c.batch_clip = 16384  # records per step; CLIP view + tokens of all of them
    c.batch_ssl = 4096  # drawn at random from the CLIP batch; 0 = no SSL views
    c.batch_rec = 2048  # drawn at random from the CLIP batch; 0 = no reconstruction view
    # CLIP view and reconstruction view.
    c.image_size = 256
    c.clip_scale = (0.9, 1.0)  # RandomResizedCrop area range: OpenCLIP's training default
    c.context_length = 77  # tokens per caption (the trainer ties it to model.text.context_length)
    # DINOv2 multi-crop (defaults of ssl_default_config, crop sizes scaled 224 -> 256: 96 -> 112).
    c.global_crops_size = 256
    c.local_crops_size = 112
    c.local_crops_number = 8
    c.global_crops_scale = (0.32, 1.0)
    c.local_crops_scale = (0.05, 0.32)
    c.flip_probability = 0.5
    c.color_jitter = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    c.color_jitter_probability = 0.8
    c.grayscale_probability = 0.2
    c.blur_sigma = (0.1, 2.0)
    # Blur probability of global crop 1 and 2, as DINOv2 states them. (DINOv2's GaussianBlur
    # wrapper passes 1 - p to RandomApply, so its code actually blurs crop 1 never and crop 2
    # with 0.9; set (0.0, 0.9) to reproduce the code rather than the stated recipe.)
    c.global_blur_probability = (1.0, 0.1)
    c.local_blur_probability = 0.5
    c.solarize_probability = 0.2  # global crop 2 only
    # iBOT masks on the global crops.
    c.patch_size = 16  # mask grid = global_crops_size / patch_size (the trainer ties it to the model)
    c.mask_ratio_min_max = (0.1, 0.5)
    c.mask_probability = 0.5
    # Decoding and robustness.
    c.min_image_side = 16  # smaller images are skipped (an upsampled 1x1 teaches nothing)
    c.max_image_pixels = 89_478_485  # larger ones are skipped before decoding (PIL's bomb limit)
    c.decode_draft_side = 512  # JPEG DCT-domain downscale while both sides stay >= this; 0 = off
    # Order and parallelism.
    c.shuffle = True
    c.num_epochs = 0  # 0 = repeat forever (each epoch shuffled differently)
    c.num_workers = 0  # grain mp_prefetch processes; 0 = all in this process
    c.worker_buffer_size = 2  # batches each worker prepares ahead
    c.read_threads = 8  # threads decoding records ahead of batching
    c.read_buffer_size = 128  # decoded records held ahead
    return c


def eval_data_config() -> ml_collections.ConfigDict:
    """The split(s) an evaluator reads (`evals.<name>.data`) or latents are extracted from
    (`latents.data`): `vtp_jax.data.eval_splits`."""
    c = ml_collections.ConfigDict()
    c.source = "procedural"  # 'procedural' | 'array_record' | 'tfds'
    c.paths = ""  # array_record: the evaluation split's shards (glob, directory or list)
    c.train_paths = ""  # array_record: the train split (probes)
    c.tfds_name = "imagenet2012"
    c.tfds_data_dir = ""
    c.split = "validation"  # tfds split evaluated; procedural: seed procedural_seed + 1 (unseen in training)
    c.train_split = "train"  # tfds split the probes fit on; procedural: seed procedural_seed
    c.procedural_seed = 0  # the training stream's seed
    c.procedural_size = 64
    c.procedural_objects = 2  # objects per scene at most
    c.procedural_sizes = ("small", "large")
    c.num_images = 1000  # images of the evaluated split (0: all; procedural needs a number)
    c.num_train_images = 2000  # probes: images of the train split
    c.image_size = 256
    c.crop = "center"  # 'center' (ADM, rFID / probes / DiT latents) or 'squash' (VTP's zero-shot)
    c.batch_size = 64  # global; divisible by the mesh's batch shards and the process count
    return c


def latents_config() -> ml_collections.ConfigDict:
    """Cached tokenizer latents for the DiT (`job='extract_latents'`, or the DiT job when
    dit.latents is empty): what to encode with which tokenizer, and how to store it."""
    c = ml_collections.ConfigDict()
    c.tokenizer = ""  # a release-format folder (a run's export/, a released VTP) or a training workdir
    c.data = eval_data_config()  # its TRAIN split is encoded (train_split / train_paths / num_train_images)
    c.data.num_train_images = 0  # 0: all (the procedural set needs a number)
    c.part_batches = 50  # global batches per output file: the unit of resumption
    c.stats_samples = 10_000  # per-channel mean / std from this many random unflipped latents (LightningDiT)
    c.stats = ""  # '' = computed as above; else a stats file / folder (the release's latents_stats.pt) to copy
    c.dtype = "float16"  # storage; latents of the released models have std 0.06-0.2, far from fp16's limits
    return c


def base_config(job: str) -> ml_collections.ConfigDict:
    """What every job reads: `job`, `seed`, `train` (the runner) and `evals` (evaluators by name,
    each a dict with a `type` from `vtp_jax.evals` and that evaluator's fields)."""
    c = ml_collections.ConfigDict()
    c.job = job
    c.seed = 0
    c.train = train_config()
    c.evals = ml_collections.ConfigDict()
    return c


def tokenizer_config(job: str) -> ml_collections.ConfigDict:
    """A job that trains a tokenizer on the grain pipeline: the model, its data and its optimizer,
    the text context length and the iBOT mask grid tied to the model's."""
    c = base_config(job)
    c.model = model_config()
    c.data = data_config()
    c.data.context_length = c.model.text.get_ref("context_length")  # one value for both
    c.data.patch_size = c.model.get_ref("patch_size")  # iBOT mask grid
    c.objectives = objectives_config()
    c.optim = optim_config()
    return c


def active(config: ml_collections.ConfigDict) -> dict[str, bool]:
    """Which objectives have a weight: only those are traced, fed and built."""
    o = config.objectives
    return {"clip": o.l_clip > 0, "ssl": o.l_ssl > 0, "rec": o.l_rec > 0}


def model_config_for(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The architecture without the parts no active objective trains (text tower, head, decoder)."""
    m = config.model.copy_and_resolve_references()
    on = active(config)
    if not on["clip"]:
        m.text.depth = 0
    if not on["ssl"]:
        m.head.prototypes = 0
    if not on["rec"]:
        m.decoder.depth = 0
    return m

def auto_fields(config: ml_collections.ConfigDict) -> list[str]:
    """The fields set to 'choose for me' (train.accum_steps = 0, a remat of 'auto'), which the
    compile-plan search resolves before a run (vtp_jax/train/aot.py)."""
    out = ["train.accum_steps"] if config.get("train", {}).get("accum_steps", 1) == 0 else []
    return out + [f"{s}.remat" for s in ("model", "dit") if config.get(s, {}).get("remat") == "auto"]


def checks_files(config: ml_collections.ConfigDict) -> bool:
    """Whether validation checks the data and weight files a run reads: not while compiling for a
    TPU topology (train.compile_for), which reads none of them (a tokenizer's config.json aside)."""
    return not config.get("train", {}).get("compile_for")


# field: (smallest allowed value, what the field means)
TRAIN_COUNTS = {
    "steps": (0, "the step the run ends at"),
    "log_every": (1, "steps between metric writes"),
    "checkpoint_every": (1, "steps between checkpoints"),
    "keep_checkpoints": (1, "checkpoints kept; 0 would delete each one right after writing it"),
    "images_every": (0, "steps between image writes; 0: none"),
    "max_nonfinite": (1, "non-finite steps in a row before the run aborts"),
    "profile_steps": (0, "steps profiled; 0: none"),
    "accum_steps": (0, "micro-batches per step; 0: auto"),
    "compile_slices": (1, "slices of the compile_for topology"),
}

CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots", "auto"),  # auto: the compile plan picks (train/aot.py)
    "model.attention": ("xla", "cudnn"),
    "model.mlp": ("swiglu", "gelu"),
    "model.norm": ("rmsnorm", "layernorm"),
    "model.clip_feat": ("cls", "pooled"),
    "model.decoder.mlp": ("swiglu", "gelu"),
    "model.decoder.norm": ("rmsnorm", "layernorm"),
    "dit.dtype": ("float32", "bfloat16"),
    "dit.remat": ("none", "full", "dots"),
    "latents.dtype": ("float16", "float32"),
}


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            return _ABSENT
        node = node[part]
    return node


_ABSENT = object()


def value_errors(config: ml_collections.ConfigDict) -> list[str]:
    """Values no job may run with, one line each naming the field, the value and what is expected:
    the runner's intervals and counts (a 0 that would divide by zero after compiling, a
    keep_checkpoints=0 that deletes every checkpoint right after writing it, a negative step
    count) and the enumerated options (a dtype such as 'bf16' that would otherwise be a KeyError
    deep inside the model)."""
    errs = []
    t = config.get("train", {})
    for name, (lo, meaning) in TRAIN_COUNTS.items():
        if name not in t:
            continue
        v = t[name]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
            errs.append(f"train.{name}={v!r}: expected an integer >= {lo} ({meaning})")
    if "divergence_factor" in t:
        f = t.divergence_factor
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not (f == 0 or f > 1):
            errs.append(f"train.divergence_factor={f!r}: expected 0 (off) or a number > 1")
    if "hbm_margin" in t and (isinstance(t.hbm_margin, bool) or not isinstance(t.hbm_margin, numbers.Real)
                              or not 0 <= t.hbm_margin < 1):
        errs.append(f"train.hbm_margin={t.hbm_margin!r}: expected a fraction in [0, 1) of device memory left free")
    for path, allowed in CHOICES.items():
        v = _get(config, path)
        if v is not _ABSENT and v not in allowed:
            errs.append(f"{path}={v!r}: expected one of {', '.join(repr(a) for a in allowed)}")
    for path, sizes in _find(config, "procedural_sizes"):  # data, latents.data, every evaluator's data
        if isinstance(sizes, str) or not sizes or any(x not in procedural.SIZES for x in sizes):
            errs.append(f"{path}={sizes!r}: expected a non-empty tuple of {tuple(procedural.SIZES)}")
    return errs


def _find(config, name: str, prefix: str = ""):
    """(dotted path, value) of every field `name` in the config's nested sections."""
    for key, value in config.items():
        if key == name:
            yield prefix + key, value
        elif isinstance(value, (ml_collections.ConfigDict, dict)):
            yield from _find(value, name, f"{prefix}{key}.")
