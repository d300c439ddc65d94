"""VTP pre-training at pod scale: the released architectures with the paper's recipe.

  --config=configs/vtp.py:L                    VTP-L (f16d64) as released: ViT-L/16 trunk (24 x 1024),
                                               symmetric decoder, CLIP text tower
  --config=configs/vtp.py:S | :B               VTP-S / VTP-B (text tower as in the release: 768 wide)
  --config=configs/vtp.py:B,objectives=ae      the paper's ablations: ae (reconstruction only), clip_ae
                                               (+ CLIP), ssl_ae (+ DINOv2 / iBOT); vtp (all three) is the default

The recipe is the paper's where it speaks (256 px, B_clip 16k / B_ssl 4k / B_rec 2k, loss weights
0.1 / 1 / 1), DINOv2's and OpenCLIP's where it is silent; bf16 compute, FSDP over 8 devices, data
parallel across hosts. The paper's scaling runs used a light 4-block decoder and QK-norm:
  --config.model.decoder.depth=4 --config.model.qk_norm=True --config.model.decoder.qk_norm=True
and the d = 256 variant: --config.model.latent_dim=256.
"""
from vtp_jax import config as config_lib
from vtp_jax import jobs

OBJECTIVES = {  # (l_clip, l_ssl); l_rec is always on
    "vtp": (1.0, 1.0),
    "ae": (0.0, 0.0),
    "clip_ae": (1.0, 0.0),
    "ssl_ae": (0.0, 1.0),
}


def parse(arg: str) -> dict:
    """'L,objectives=ae' -> {'size': 'L', 'objectives': 'ae'}; one error naming what is wrong."""
    out = {"size": "B", "objectives": "vtp"}
    for i, part in enumerate(p.strip() for p in (arg or "").split(",") if p.strip()):
        key, value = part.split("=", 1) if "=" in part else ("size" if i == 0 else part, None)
        if key not in out or value is None and key != "size":
            raise ValueError(f"configs/vtp.py: unknown argument {part!r}: expected 'S|B|L[,objectives=...]'")
        out[key] = part if value is None else value
    if out["size"] not in config_lib.VIT_SIZES:
        raise ValueError(f"configs/vtp.py: size {out['size']!r}: expected one of {sorted(config_lib.VIT_SIZES)}")
    if out["objectives"] not in OBJECTIVES:
        raise ValueError(f"configs/vtp.py: objectives={out['objectives']!r}: expected one of {sorted(OBJECTIVES)}")
    return out


def get_config(arg: str = "B"):
    a = parse(arg)
    c = jobs.default_config("pretrain")
    config_lib.with_size(c.model, a["size"])
    c.model.dtype = "bfloat16"  # compute; params and optimizer state stay float32
    c.model.remat = "dots"
    c.model.scan_layers = True  # one compiled block per stack: VTP-L compiles in ~2 min, not ~14
    d = c.data  # paper: 256 px, B_clip 16k, B_ssl 4k, B_rec 2k (the data_config defaults)
    d.source = "array_record"
    d.paths = ""  # required: --config.data.paths='gs://.../*.array_record'
    d.num_workers = 8
    o = c.objectives  # paper: l_rec 0.1, l_ssl 1, l_clip 1 (the defaults)
    o.l_clip, o.l_ssl = OBJECTIVES[a["objectives"]]
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
