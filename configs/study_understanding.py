"""The paper's finding in miniature, "understanding drives generation" (vtp_jax/study.py):

  python -m vtp_jax.main --config=configs/study_understanding.py --workdir=W          # the study
  python -m vtp_jax.main --config=configs/study_understanding.py:smoke --workdir=W    # every stage, minutes

Four demo-size tokenizers (configs/demo.py's architecture, steps and batch: equal compute) that
differ only in their objectives (AE, CLIP+AE, SSL+AE, VTP), two seeds each; every tokenizer gets
the same evaluation and the same tiny class-conditional DiT (configs/dit_demo.py's recipe) on its
own latents. Scenes hold one object, so an image's class (colour, shape) is in the image and a
domain classifier can check generated samples against the class they were asked for.
"""
import importlib.util
import os

from vtp_jax import jobs
from vtp_jax.evals import evaluator


def _template(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(arg: str = ""):
    if arg not in ("", "smoke"):
        raise ValueError(f"configs/study_understanding.py:{arg}: the variants are '' and 'smoke'")
    c = jobs.default_config("study")
    s = c.study
    s.seeds = (0, 1)
    tok = _template("demo")
    tok.data.procedural_objects = 1
    tok.evals = {}  # every tokenizer is evaluated by the study's own `evals` below
    tok.train.update(steps=300, images_every=0, checkpoint_every=300, log_every=50)
    s.tokenizer = tok
    dit = _template("dit_demo")
    dit.latents.data.procedural_objects = 1
    dit.latents.data.num_train_images = 4096
    dit.train.update(steps=600, checkpoint_every=600, log_every=100)
    dit.dit.sample.every = 600
    dit.evals = dict(
        generation_classes=evaluator.entry("class_conditional", classifier_params="", samples_per_class=16, batch_size=64,
                                data=dict(source="procedural", procedural_objects=1, procedural_size=64, image_size=64,
                                          batch_size=64, num_images=1024)),
        val_loss=evaluator.entry("flow_loss", latents="", batch_size=64, t_mu=dit.dit.t_mu, t_sigma=dit.dit.t_sigma))
    s.dit = dit
    data = dict(source="procedural", procedural_objects=1, procedural_size=64, image_size=64, batch_size=64,
                num_images=1024, num_train_images=4096)
    s.evals = dict(
        reconstruction=evaluator.entry("reconstruction", data=data),
        zero_shot=evaluator.entry("zero_shot", classes="procedural", data=dict(data, crop="squash")),
        linear_probe=evaluator.entry("linear_probe", features=("latent_pooled", "latent_flat"), data=data),
        knn=evaluator.entry("knn", features=("latent_pooled",), data=data))
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
        tok.train.update(steps=2, checkpoint_every=2, log_every=1)
        dit.latents.data.update(image_size=16, procedural_size=16, batch_size=16, num_train_images=128)
        dit.latents.part_batches, dit.latents.stats_samples = 4, 100
        dit.dit.batch_size = 16
        dit.dit.sample.update(num_steps=3, every=2, classes=4, per_class=2)
        dit.train.update(steps=2, checkpoint_every=2, log_every=1)
        g = dit.evals.generation_classes
        g.update(samples_per_class=1, batch_size=16)
        g.data.update(procedural_size=16, image_size=16, batch_size=16, num_images=64)
        dit.evals.val_loss.batch_size = 16
        for e in s.evals.values():
            e.data.update(procedural_size=16, image_size=16, batch_size=16, num_images=32, num_train_images=64)
        s.evals.linear_probe.update(epochs=1, lrs=(1e-3, 1e-1))
        s.seeds = (0,)
        s.variants = ("ae", "vtp")  # the two ends: every stage, half the compiles
        s.classifier.update(num_train=512, num_val=256, image_size=16, steps=20, width=8)
    return c
