"""VTP-S (f16d64) as released: ViT-S/16 trunk and decoder; text tower as in the release (768)."""
from vtp_jax import config as config_lib


def get_config():
    c = config_lib.default_config()
    config_lib.with_size(c.model, "S")
    return c
