"""LightningDiT-B/1 on VTP-L latents, the release's demo: dopri5 sampling (50 grid points), FID-10k.

  python -m vtp_jax.main --config=configs/dit_b_vtp_l.py --config.dit.latents=L --workdir=W \\
    --config.evals.gfid.inception_params=inception.msgpack \\
    --config.evals.gfid.reference_stats=VIRTUAL_imagenet256_labeled.npz

(L from configs/extract_latents.py with VTP-L; the rest of the recipe is configs/dit_xl_vtp_l.py's.)
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("dit_xl_vtp_l", os.path.join(os.path.dirname(__file__), "dit_xl_vtp_l.py"))
_xl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_xl)


def get_config():
    c = _xl.recipe("B", 100_000)
    c.dit.sample.method, c.dit.sample.num_steps = "dopri5", 50
    c.evals.gfid.num_samples = 10_000
    return c
