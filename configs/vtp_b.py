"""VTP-B (f16d64) as released: ViT-B/16 trunk, symmetric 12-block decoder, CLIP-B text tower.
Trained with the paper's recipe: `vtp_jax.config.paper_recipe` (bf16, FSDP, 16k / 4k / 2k batches).
"""
from vtp_jax import config as config_lib


def get_config():
    c = config_lib.default_config()
    config_lib.paper_recipe(c, "B")
    return c
