"""Stage 2 on the demo tokenizer: its pixel decoder fine-tuned with a PatchGAN, the encoder frozen.

  python -m vtp_jax.main --config=configs/demo_stage2.py --config.train.init_from=/tmp/vtp_demo/export --workdir=W

Leaves W/reconstructions/*.png (rows: input | before | after), TensorBoard scalars of both players,
W/metrics_start.json and W/metrics.json (PSNR, SSIM on procedural validation images; LPIPS and
rFID with --config.evals.reconstruction.lpips_params / inception_params), and W/export (the same
encoder, the new decoder). LPIPS is off here (no VGG weights ship), so the generator loss is
L1 + the adaptive-weighted GAN term.
"""
from vtp_jax import jobs
from vtp_jax.evals import evaluator


def get_config():
    c = jobs.default_config("stage2")
    d = c.data
    d.source = "procedural"
    d.image_size = d.procedural_size = 64
    d.batch_clip = d.batch_rec = 16
    d.batch_ssl = 0
    d.read_threads = 2
    s = c.stage2
    s.lpips_weight = 0.0
    s.disc_start = 50  # the decoder is already trained: a short discriminator-free start, then the game
    s.disc_ndf, s.disc_layers = 64, 3
    s.disc_lr = 2e-4
    s.regularizer = "lecam"
    o = c.optim
    o.lr, o.min_lr, o.warmup_steps = 5e-5, 1e-6, 20
    o.b1, o.b2 = 0.5, 0.9  # taming's generator betas
    o.weight_decay = o.weight_decay_end = 0.0
    t = c.train
    t.steps, t.log_every, t.checkpoint_every, t.images_every = 300, 25, 100, 100
    t.eval_at_start = True
    c.evals.reconstruction = evaluator.entry("reconstruction", data=dict(source="procedural", procedural_size=64,
                                                                   image_size=64, batch_size=64, num_images=512))
    return c
