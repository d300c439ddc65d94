"""A tiny VTP that trains on a laptop CPU in minutes: 64 px images, patch 8, width 192."""
from vtp_jax import config as config_lib


def get_config():
    c = config_lib.default_config()
    m = c.model
    m.patch_size = 8
    m.width, m.depth, m.num_heads = 192, 4, 3
    m.decoder.width, m.decoder.depth, m.decoder.num_heads = 192, 2, 3
    m.text.width, m.text.depth, m.text.num_heads = 128, 2, 2
    m.text.context_length = 32
    m.clip_dim = 128
    m.head.hidden_dim, m.head.bottleneck_dim, m.head.prototypes = 256, 64, 1024
    m.latent_dim = 16
    return c
