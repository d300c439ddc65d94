"""LightningDiT-XL/1 on VTP-L latents: the release's generation recipe (gFID 2.81 at 80 epochs, no CFG).

  python -m vtp_jax.main --config=configs/extract_latents.py --config.latents.tokenizer=MiniMaxAI/VTP-Large-f16d64 --workdir=L
  python -m vtp_jax.main --config=configs/dit_xl_vtp_l.py --config.dit.latents=L --workdir=W \\
    --config.evals.gfid.inception_params=inception.msgpack \\
    --config.evals.gfid.reference_stats=VIRTUAL_imagenet256_labeled.npz

XL/1 (28 x 1152, 16 heads, SwiGLU, RMSNorm, RoPE) on 16 x 16 x 64 latents, rectified flow with the
velocity target, MSE + cosine loss, logit-normal t (mu -0.75, sigma 1 for VTP-L), AdamW 2e-4
(0.9, 0.95), no weight decay, no schedule, no clipping, EMA 0.9999, global batch 1024, 100k steps
(~80 epochs), bf16 compute; FID-50k with 250-point Euler and time shift 0.075, labels uniform.
On a v6e-64 the TPU compile plan (`--config.train.compile_for=v6e-64`) fits the step at
accum_steps 1, only just: 27.74 GiB per chip of 28.80 usable (docs/cluster.md, step 1).
"""
from vtp_jax import jobs
from vtp_jax.evals import evaluator


def recipe(size: str, steps: int):
    c = jobs.default_config("dit")
    d = c.dit
    d.size, d.patch_size, d.dtype, d.scan_layers = size, 1, "bfloat16", True
    d.batch_size, d.ema_decay = 1024, 0.9999
    d.t_mu, d.t_sigma = -0.75, 1.0
    o = c.optim
    o.lr = o.min_lr = 2e-4  # constant
    o.warmup_steps, o.b1, o.b2, o.eps = 0, 0.9, 0.95, 1e-8
    o.weight_decay = o.weight_decay_end = 0.0
    o.clip_grad = 0.0
    t = c.train
    t.steps, t.mesh = steps, (-1, 1, 1)
    t.log_every, t.checkpoint_every = 100, 5_000
    c.dit.sample.every = 5_000
    c.evals.gfid = evaluator.entry("generation", every=0, num_samples=50_000, batch_size=256, inception_params="",
                        reference_stats="")
    return c


def get_config():
    return recipe("XL", 100_000)
