"""The paper's ablation: CLIP + reconstruction, VTP-B shapes, the rest of the VTP recipe."""
from vtp_jax import config as config_lib


def get_config():
    c = config_lib.default_config()
    config_lib.paper_recipe(c, "B")
    c.objectives.l_clip = 1.0
    c.objectives.l_ssl = 0.0
    return c
