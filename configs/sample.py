"""Class-conditional samples of a DiT as one file for FID (ADM / guided-diffusion's evaluator):

  python -m vtp_jax.main --config=configs/sample.py --config.sample.checkpoint=DIR --workdir=W
  python -m vtp_jax.main --config=configs/sample.py:demo --config.sample.checkpoint=/tmp/vtp_dit --workdir=W

The default is ImageNet's FID-50k (50 samples of each of 1000 classes); `:demo` is the laptop
scale for the DiT demo's 64 classes (1,024 samples, 16 of each), whose workdir the README's
`configs/dit_demo.py` command leaves in /tmp/vtp_dit.

DIR is a `dit` workdir (its config.json and the EMA params of its newest checkpoint; the sampler,
the latent statistics and the decoding tokenizer are the run's unless --config.sample.* says
otherwise) or an official LightningDiT checkpoint file (.pt, or its state dict as .safetensors /
.npz), which then needs --config.sample.tokenizer=DIR (the VTP it was trained on: a release folder
or hub id) and --config.sample.latent_stats=FILE (the release's latents_stats.pt).

W/samples.npz holds arr_0, (N, H, W, 3) uint8, and arr_1, the labels: hand it to guided-diffusion's
evaluations/evaluator.py with the reference batch (VIRTUAL_imagenet256_labeled.npz). W/samples.png
is a preview grid. Resumable: the samples are made in parts (W/parts/part-<k>.npz, part_size
samples each) and a rerun of the same command continues after the last finished part, with the
same images as an uninterrupted run (sample i's noise depends on sample.seed and i only).

Defaults: FID-50k, a global batch of 256 and class-balanced labels (labels='per_class': 50 of each
of ImageNet's 1000 classes, in class order), the class-balanced FID-50k protocol;
--config.sample.labels=uniform draws the classes at random instead (seeded), as LightningDiT's
sampling script (torch.randint per batch) does. The sampler (num_steps, shift, method, cfg_scale,
cfg_interval_start, cfg_channels) is the DiT's dit.sample unless set here, e.g. VTP's
headline setting is the dit job's default (250 grid points, shift 0.075, no guidance).
"""
from vtp_jax import jobs


def get_config(arg: str = "imagenet"):
    c = jobs.default_config("sample")
    s = c.sample
    s.labels = "per_class"  # num_samples / classes of each class: num_samples must be a multiple of the classes
    s.preview = 8  # an 8 x 8 grid of 8 classes
    if arg == "imagenet":
        s.num_samples = 50_000  # FID-50k: 50 of each of 1000 classes
        s.batch_size = 256  # global
        s.part_size = 2048  # 8 batches per resumable part (25 parts)
    elif arg == "demo":
        s.num_samples = 1024  # 16 of each of the demo's 64 (colour, shape) classes, as the study scores them
        s.batch_size = 64
        s.part_size = 256
    else:
        raise ValueError(f"configs/sample.py:{arg}: expected 'imagenet' (the default) or 'demo'")
    return c
