"""Cache a tokenizer's latents of ImageNet train (ADM centre crop 256, unflipped + flipped) for the DiT:

  python -m vtp_jax.main --config=configs/extract_latents.py --config.latents.tokenizer=MiniMaxAI/VTP-Large-f16d64 \\
    --workdir=gs://bucket/latents/vtp_l

then `--config.dit.latents=gs://bucket/latents/vtp_l` in configs/dit_xl_vtp_l.py. Needs ImageNet in
TFDS's array_record format. Resumable: a rerun skips the parts already written. For ArrayRecord
shards: --config.latents.data.source=array_record --config.latents.data.train_paths='.../*.array_record'.
"""
from vtp_jax import jobs


def get_config():
    c = jobs.default_config("extract_latents")
    d = c.latents.data
    d.source, d.tfds_name, d.train_split = "tfds", "imagenet2012", "train"
    d.image_size, d.crop, d.batch_size = 256, "center", 256
    d.num_train_images = 0  # all 1.28M
    return c
