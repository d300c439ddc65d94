"""Stage 2 for VTP-L: the pixel decoder fine-tuned with a PatchGAN (taming / LDM recipe; the paper
gives no stage-2 settings), the encoder frozen, on ArrayRecord shards at 256 px.

  python -m vtp_jax.main --config=configs/vtp_l_stage2.py --config.train.init_from=MiniMaxAI/VTP-Large-f16d64 \\
    --config.data.paths='gs://bucket/datacomp/*.array_record' --config.stage2.lpips_params=lpips_vgg16.msgpack \\
    --config.evals.reconstruction.lpips_params=lpips_vgg16.msgpack \\
    --config.evals.reconstruction.inception_params=inception.msgpack --workdir=W
"""
from vtp_jax import jobs
from vtp_jax.evals import evaluator


def get_config():
    c = jobs.default_config("stage2")
    d = c.data
    d.source, d.paths, d.num_workers = "array_record", "", 8
    d.image_size = 256
    d.batch_clip = d.batch_rec = 256
    d.batch_ssl = 0
    s = c.stage2
    s.lpips_weight, s.l1_weight = 1.0, 1.0
    s.disc_weight, s.disc_start = 0.5, 0
    s.regularizer = "lecam"
    o = c.optim
    o.lr, o.min_lr, o.warmup_steps = 1e-4, 1e-6, 1_000
    o.b1, o.b2 = 0.5, 0.9
    o.weight_decay = o.weight_decay_end = 0.0
    t = c.train
    t.steps, t.mesh = 50_000, (-1, 8, 1)
    t.log_every, t.checkpoint_every, t.images_every = 100, 2_000, 2_000
    t.eval_at_start = True
    c.evals.reconstruction = evaluator.entry("reconstruction", every=10_000,
                                  data=dict(source="tfds", tfds_name="imagenet2012", split="validation",
                                            image_size=256, batch_size=256, num_images=10_000))
    return c
