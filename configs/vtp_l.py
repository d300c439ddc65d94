"""VTP-L (f16d64) as released: ViT-L/16 trunk (24 x 1024), symmetric decoder, CLIP text tower.
Trained with the paper's recipe: `vtp_jax.config.paper_recipe` (bf16, FSDP, 16k / 4k / 2k batches).

The paper's scaling runs used a light 4-block decoder and QK-norm:
  --config.model.decoder.depth=4 --config.model.qk_norm=True --config.model.decoder.qk_norm=True
and the d = 256 variant: --config.model.latent_dim=256.
"""
from vtp_jax import config as config_lib


def get_config():
    c = config_lib.default_config()
    config_lib.paper_recipe(c, "L")
    return c
