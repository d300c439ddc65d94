"""Evaluate a demo-size tokenizer on the procedural data (the README's evaluation command):

  python -m vtp_jax.main --config=configs/eval_demo.py --config.eval.checkpoint=/tmp/vtp_demo/export --workdir=W

Reconstruction (PSNR, SSIM; LPIPS and rFID when --config.evals.reconstruction.lpips_params /
inception_params name converted weight files), zero-shot over the 64 (colour, shape) classes, the
linear probe and kNN on the bottleneck latent and on DINOv2-style trunk features. Validation images
come from procedural seed 1, unseen in training (seed 0); the probes fit on seed 0.
"""
from vtp_jax import jobs
from vtp_jax.evals import evaluator


def get_config():
    c = jobs.default_config("eval")
    data = dict(source="procedural", procedural_size=64, image_size=64, batch_size=64, num_images=512,
                num_train_images=2048)
    c.evals.reconstruction = evaluator.entry("reconstruction", data=data)
    c.evals.zero_shot = evaluator.entry("zero_shot", classes="procedural", data=dict(data, crop="squash"))
    c.evals.linear_probe = evaluator.entry("linear_probe", features=("latent_pooled", "latent_flat", "cls4_patch"),
                                data=data)
    c.evals.knn = evaluator.entry("knn", features=("latent_pooled", "cls"), data=data)
    return c
