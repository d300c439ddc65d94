"""A tiny VTP that trains on a laptop CPU in minutes: all three objectives on the embedded
procedural image-caption data, 64 px images, patch 8, width 192."""
from vtp_jax import config as config_lib


def get_config():
    c = config_lib.default_config()
    m = c.model
    m.patch_size = 8
    m.width, m.depth, m.num_heads = 192, 4, 3
    m.decoder.width, m.decoder.depth, m.decoder.num_heads = 192, 2, 3
    m.text.width, m.text.depth, m.text.num_heads = 128, 2, 2
    m.text.context_length = 32  # procedural captions are short
    m.clip_dim = 128  # = text width, as in the release (so the result exports in its format)
    m.head.hidden_dim, m.head.bottleneck_dim, m.head.prototypes = 256, 64, 1024
    m.latent_dim = 16  # 8x8x3 pixels per token -> 16 channels: VTP's 12x compression at f16d64

    d = c.data
    d.source = "procedural"
    d.image_size = d.global_crops_size = d.procedural_size = 64
    d.local_crops_size, d.local_crops_number = 32, 4
    d.batch_clip, d.batch_ssl, d.batch_rec = 32, 8, 8
    d.read_threads = 2

    o = c.objectives
    o.lpips_weight = 0.0  # LPIPS needs VGG weight files (see README); the demo runs without them
    o.l_rec = 1.0  # paper: 0.1; raised so that 300 CPU steps already show reconstructions
    o.warmup_teacher_temp_steps = 100

    opt = c.optim
    opt.lr, opt.warmup_steps = 1e-3, 50

    t = c.train
    t.steps = 300
    t.log_every = 25
    t.checkpoint_every = 100
    t.images_every = 100
    return c
