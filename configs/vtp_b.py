"""VTP-B (f16d64) as released: ViT-B/16 trunk, symmetric 12-block decoder, CLIP-B text tower."""
from vtp_jax import config as config_lib


def get_config():
    c = config_lib.default_config()
    config_lib.with_size(c.model, "B")
    return c
