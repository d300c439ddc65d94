"""VTP-S (f16d64) as released: ViT-S/16 trunk and decoder; text tower as in the release (768).
Trained with the paper's recipe: `vtp_jax.config.paper_recipe` (bf16, FSDP, 16k / 4k / 2k batches).
"""
from vtp_jax import config as config_lib


def get_config():
    c = config_lib.default_config()
    config_lib.paper_recipe(c, "S")
    return c
