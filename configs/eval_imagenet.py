"""Evaluate a tokenizer with the release's ImageNet protocols (numbers comparable with the paper):

  python -m vtp_jax.main --config=configs/eval_imagenet.py --config.eval.checkpoint=MiniMaxAI/VTP-Large-f16d64 \\
    --config.evals.reconstruction.lpips_params=lpips_vgg16.msgpack \\
    --config.evals.reconstruction.inception_params=inception.msgpack --workdir=W

Needs ImageNet in TFDS's array_record format (`tfds build imagenet2012 --file_format=array_record`
with the manual download; set --config.evals.*.data.tfds_data_dir if not the default).

- reconstruction: the 50k validation images, ADM centre crop 256: PSNR, SSIM, LPIPS (VGG) and rFID
  against the crops (pytorch-fid's Inception; both sides as truncated uint8), as tools/ of the release;
- zero-shot: squash resize to 256, OpenCLIP's 1000 names x the 80 OpenAI templates, 100 x cosine;
- linear probe: DINOv2's lr sweep on the last-4-blocks cls + mean patch features and on the pooled
  bottleneck latent. Differences from DINOv2's protocol, said plainly: features are extracted once
  from ADM 256 centre crops (no RandomResizedCrop / flip augmentation at 224 px), and the train
  split is subsampled to num_train_images (128k by default; 0 = all 1.28M, which needs
  N x D floats of host memory per feature set);
- kNN: DINO's k = 20, T = 0.07 weighted vote on the cls token.
"""
from vtp_jax import jobs
from vtp_jax.evals import evaluator


def get_config():
    c = jobs.default_config("eval")
    c.train.mesh = (-1, 1, 1)
    data = dict(source="tfds", tfds_name="imagenet2012", split="validation", train_split="train", image_size=256,
                batch_size=256, num_images=0, num_train_images=128_000)
    c.evals.reconstruction = evaluator.entry("reconstruction", data=data)
    c.evals.zero_shot = evaluator.entry("zero_shot", classes="imagenet", data=dict(data, crop="squash"))
    c.evals.linear_probe = evaluator.entry("linear_probe", features=("cls4_patch", "latent_pooled"), num_classes=1000,
                                data=data)
    c.evals.knn = evaluator.entry("knn", features=("cls",), num_classes=1000, data=data)
    return c
