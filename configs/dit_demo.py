"""A small LightningDiT on the demo tokenizer's latents of the procedural data: trains and draws the
requested object on a laptop CPU in minutes (the README's DiT command, and the study's recipe):

  python -m vtp_jax.main --config=configs/dit_demo.py --workdir=W

It first encodes 4096 procedural scenes of one large object (unflipped + flipped) with the
tokenizer of the README's demo run (/tmp/vtp_demo/export; another with
--config.latents.tokenizer=DIR) into W/latents, then trains a 4-block DiT of width 192 on its
8 x 8 x 16 latents (patch 2: 16 tokens), conditioned on the 64 (colour, shape) classes, and leaves
class-conditional sample grids in W/samples/*.png (rows: eight classes that differ in colour and
shape) and its losses in TensorBoard. Why this recipe: benchmarks/RESULTS.md, "The study's DiT
recipe". gFID needs Inception weights (--config.evals.gfid.inception_params); without them it says
so and the rest runs.
"""
from vtp_jax import jobs
from vtp_jax.evals import evaluator


def get_config():
    c = jobs.default_config("dit")
    d = c.dit
    d.size, d.patch_size, d.batch_size = "mini", 2, 64
    d.t_mu, d.t_sigma = -0.5, 1.25  # VTP-S / B's logit-normal
    # EMA on the run's time scale: 0.9999 averages over 10k steps, longer than this whole run.
    d.ema_decay = 0.99
    d.sample.num_steps, d.sample.shift, d.sample.every = 50, 0.3, 1500
    # Guidance makes the class visible in every sample (the official headline numbers use none).
    d.sample.cfg_scale = 4.0
    d.sample.classes, d.sample.per_class = 8, 8
    lat = c.latents
    lat.tokenizer = "/tmp/vtp_demo/export"
    lat.data.update(source="procedural", procedural_objects=1, procedural_sizes=("large",), procedural_size=64,
                    image_size=64, batch_size=64, num_train_images=4096)
    lat.part_batches = 16
    o = c.optim
    o.lr, o.min_lr, o.warmup_steps = 1e-3, 1e-4, 50
    o.b1, o.b2, o.eps = 0.9, 0.95, 1e-8
    o.weight_decay = o.weight_decay_end = 0.0
    o.clip_grad = 1.0
    t = c.train
    t.steps, t.log_every, t.checkpoint_every = 4500, 250, 1500
    c.evals.gfid = evaluator.entry("generation", every=0, num_samples=512, batch_size=64, inception_params="")
    return c
