"""The paper's claim in miniature, and iREPA's rival explanation (vtp_jax/jobs/study.py):

  python -m vtp_jax.main --config=configs/study_understanding.py --workdir=W          # ~1 hour, 2 CPU cores
  python -m vtp_jax.main --config=configs/study_understanding.py:smoke --workdir=W    # every stage, minutes
  python -m vtp_jax.main --config=configs/study_understanding.py:large --workdir=W    # an accelerator's budget

Default: an AE and VTP at two tokenizer compute budgets (150 and 600 steps of configs/demo.py's
architecture), one seed with 95% bootstrap intervals over the DiT's samples; every tokenizer gets
the same evaluation and the same DiT recipe (benchmarks/RESULTS.md, "The study's DiT recipe") on
its own latents. Scenes hold one large object, so an image's class (colour, shape) is in the image,
a 64 px tokenizer keeps its shape, and a domain classifier can check generated samples against
the class they were asked for. `--config.study.variants='("ae","clip_ae","ssl_ae","vtp")'` and
`--config.study.seeds='(0,1,2)'` widen it (about 30 min per tokenizer and seed).
"""
import importlib.util
import os

from vtp_jax import jobs
from vtp_jax.evals import evaluator

VARIANTS = ("", "smoke", "full", "large")


def _template(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(arg: str = ""):
    if arg not in VARIANTS:
        raise ValueError(f"configs/study_understanding.py:{arg}: the variants are {VARIANTS}")
    c = jobs.default_config("study")
    s = c.study
    scene = dict(source="procedural", procedural_objects=1, procedural_sizes=("large",), procedural_size=64,
                 image_size=64, batch_size=64)

    tok = _template("demo")
    tok.data.procedural_objects, tok.data.procedural_sizes = 1, ("large",)
    tok.evals = {}  # every tokenizer is evaluated by the study's own `evals` below
    tok.train.update(steps=150, images_every=0, log_every=50)
    s.tokenizer = tok

    dit = _template("dit_demo")  # the study's DiT recipe (configs/dit_demo.py: mini, patch 2, 4,500 steps, CFG 4)
    dit.latents.data.update(procedural_objects=1, procedural_sizes=("large",), num_train_images=4096)
    dit.train.update(checkpoint_every=dit.train.steps, log_every=250)
    dit.dit.sample.every = dit.train.steps
    dit.evals = dict(
        generation_classes=evaluator.entry("class_conditional", classifier_params="", samples_per_class=16,
                                           batch_size=64, cfg_scale=dit.dit.sample.cfg_scale,
                                           data=dict(scene, num_images=1024)),
        val_loss=evaluator.entry("flow_loss", latents="", batch_size=64, t_mu=dit.dit.t_mu, t_sigma=dit.dit.t_sigma))
    s.dit = dit

    data = dict(scene, num_images=1024, num_train_images=4096)
    s.evals = dict(
        reconstruction=evaluator.entry("reconstruction", data=data),
        zero_shot=evaluator.entry("zero_shot", classes="procedural", data=dict(data, crop="squash")),
        linear_probe=evaluator.entry("linear_probe", features=("latent_pooled", "latent_flat"), data=data),
        knn=evaluator.entry("knn", features=("latent_pooled",), data=data),
        latent_structure=evaluator.entry("latent_structure", data=data))

    if arg == "smoke":  # every stage for a few steps on tiny models: fills the same table in minutes
        m = tok.model
        m.width, m.depth, m.num_heads = 32, 1, 2
        m.decoder.width, m.decoder.depth, m.decoder.num_heads = 32, 1, 2
        m.text.width, m.text.depth, m.text.num_heads = 32, 1, 2
        m.clip_dim, m.latent_dim = 32, 8
        m.head.hidden_dim, m.head.bottleneck_dim, m.head.prototypes = 32, 16, 64
        d = tok.data
        d.image_size = d.global_crops_size = d.procedural_size = 16
        d.local_crops_size, d.local_crops_number = 8, 2
        d.batch_clip, d.batch_ssl, d.batch_rec = 16, 8, 8
        tok.train.update(steps=2, log_every=1)
        dit.dit.size, dit.dit.patch_size = "tiny", 1
        dit.latents.data.update(image_size=16, procedural_size=16, batch_size=16, num_train_images=128)
        dit.latents.part_batches, dit.latents.stats_samples = 4, 100
        dit.dit.batch_size = 16
        dit.dit.sample.update(num_steps=3, every=2, classes=4, per_class=2)
        dit.train.update(steps=2, checkpoint_every=2, log_every=1)
        g = dit.evals.generation_classes
        g.update(samples_per_class=1, batch_size=16, bootstrap=100)
        g.data.update(procedural_size=16, image_size=16, batch_size=16, num_images=64)
        dit.evals.val_loss.batch_size = 16
        for e in s.evals.values():
            e.data.update(procedural_size=16, image_size=16, batch_size=16, num_images=32, num_train_images=64)
        s.evals.linear_probe.update(epochs=1, lrs=(1e-3, 1e-1))
        s.evals.latent_structure.far_dist = 2  # a 2 x 2 latent grid
        s.budgets = (1, 2)  # both budgets' code paths, still seconds
        s.classifier.update(num_train=512, num_val=256, image_size=16, steps=20, width=8,
                            min_accuracy=0.0)  # 20 steps: its scores test the plumbing, not tokenizers
    elif arg == "full":  # the paper's four-way ablation on the default recipe, three seeds: 24 tokenizers
        # and 24 DiTs, about a day on 2 shared cores (measured: a 1x tokenizer 6.4 min, its DiT 60 min)
        s.variants = ("ae", "clip_ae", "ssl_ae", "vtp")
        s.seeds = (0, 1, 2)
        dit.train.checkpoint_every = 500  # it spans sessions: a stop loses at most 500 DiT steps
    elif arg == "large":  # an accelerator's budget: all four objectives, three budgets, three seeds
        tok.train.update(steps=2_500, log_every=100)
        tok.data.update(batch_clip=256, batch_ssl=64, batch_rec=64)
        tok.optim.warmup_steps = 500
        s.variants = ("ae", "clip_ae", "ssl_ae", "vtp")
        s.budgets = (1, 4, 16)
        s.seeds = (0, 1, 2)
        dit.dit.update(size="B", patch_size=1, batch_size=256)
        dit.latents.data.num_train_images = 65_536
        dit.train.update(steps=50_000, checkpoint_every=5_000, log_every=500)
        dit.dit.sample.every = 10_000
        dit.optim.update(lr=2e-4, min_lr=2e-5, warmup_steps=1_000)
        dit.dit.ema_decay = 0.9999
        dit.evals.generation_classes.samples_per_class = 100
        for e in s.evals.values():
            e.data.update(num_images=4096, num_train_images=16_384)
        s.classifier.update(num_train=32_768, num_val=4096, steps=3_000)
    return c
