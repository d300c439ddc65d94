"""gFID and Inception Score of a class-conditional generator (the DiT job's `Generator`).

N samples (labels uniform at random, noise seeded) are generated batch by batch with the batch
sharded over the mesh, quantized as the release does (truncated uint8), and only their Inception
statistics are kept (streamed; no image is written). FID is against reference statistics (ADM's
VIRTUAL_imagenet256_labeled.npz, or our own from `fid.save_stats`), or, without a file, against
the statistics of a real split read here (procedural or any dataset) and cached on disk.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vtp_jax import images, objectives, sharding
from vtp_jax.data import eval_splits
from vtp_jax.data import latents as latents_lib
from vtp_jax.evals import evaluator, fid
from vtp_jax.models.classifier import DomainClassifier


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """exp(E_x KL(p(y|x) || p(y))) averaged over splits of `split_size` samples (ADM's evaluator),
    from the FID Inception's 1008-way logits."""
    logits = np.asarray(logits, np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    scores = []
    for start in range(0, len(p), split_size):
        part = p[start:start + split_size]
        marginal = part.mean(0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(marginal, 1e-30, None)))).sum(-1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


class GenerationEvaluator:
    @staticmethod
    def defaults():
        c = ml_collections.ConfigDict()
        c.num_samples = 10_000  # 50k for the paper's protocol
        c.batch_size = 64  # global samples per generation step
        c.inception_params = ""  # `python -m vtp_jax.checkpoints.torch_convert inception` output
        c.reference_stats = ""  # .npz with mu, sigma; '' = real images of `data` (cached next to the workdir)
        c.seed = 0
        return c

    def __init__(self, generator, mesh, e):
        self.generator, self.mesh, self.e = generator, mesh, e
        self.enabled = not evaluator.missing_weights("generation", "Inception", e.inception_params,
                                                     "inception_params")
        if not self.enabled:
            return
        replicated = NamedSharding(mesh, P())
        self.inception = jax.device_put(fid.load_inception_params(e.inception_params), replicated)

        def stats(images, valid):  # images: uint8 values / 255
            feats = fid.inception_features(self.inception, images)
            logits = feats @ self.inception["fc"]["kernel"] + self.inception["fc"]["bias"]
            return fid.batch_moments(feats, valid), logits

        self._stats = jax.jit(stats)
        self._reference = None

    def reference(self):
        """(mu, sigma) of the reference: the file if given, else the real images of `data`."""
        if self._reference is None:
            if self.e.reference_stats:
                self._reference = fid.load_reference_stats(self.e.reference_stats)
            else:
                real = fid.FeatureStats()
                for b in eval_splits.batches(self.e.data, self.mesh):
                    real.update(jax.device_get(self._stats(_quantize(b["images"], jnp.round), b["valid"])[0]))
                self._reference = real.mu(), real.sigma()
                logging.info("generation: reference statistics from %d real images of %s", real.count,
                             self.e.data.source)
        return self._reference

    def run(self, params) -> dict:
        if not self.enabled:
            return {}
        from jax.experimental import multihost_utils

        g, e = self.generator, self.e
        rng = np.random.default_rng(e.seed)
        fake, logits = fid.FeatureStats(), []
        place = lambda a: jax.device_put(a, sharding.batch_sharding(self.mesh, a.ndim))  # noqa: E731
        for start in range(0, e.num_samples, e.batch_size):
            n = min(e.batch_size, e.num_samples - start)
            labels = rng.integers(0, g.num_classes, e.batch_size).astype(np.int32)
            noise = rng.standard_normal((e.batch_size, *g.latent_shape)).astype(np.float32)
            images = g.images(params, place(noise), place(labels))
            truncated = jnp.floor(255 * images) / 255  # as the release writes its samples: truncated uint8
            moments, lg = self._stats(truncated, place(np.arange(e.batch_size) < n))
            fake.update(jax.device_get(moments))
            logits.append(np.asarray(multihost_utils.process_allgather(lg, tiled=True))[:n])
        mu, sigma = self.reference()
        return {"fid": fid.frechet_distance(fake.mu(), fake.sigma(), mu, sigma),
                "is": inception_score(np.concatenate(logits))}


def _quantize(x, how):
    """ImageNet-normalized batch (what `eval_splits.batches` yields) -> uint8 values / 255."""
    return how(255 * images.denormalize(x)) / 255


class ClassConditionalEvaluator:
    """How recognizable class-conditional samples are, scored by a domain classifier trained on
    real images (`vtp_jax.models.classifier`): the accuracy of its prediction against the class
    each sample was generated for, and the Frechet distance between Gaussians fitted to its
    penultimate features of generated and of real images (FID's idea with this domain's network)."""

    @staticmethod
    def defaults():
        c = ml_collections.ConfigDict()
        c.classifier_params = ""  # msgpack of vtp_jax.models.classifier.DomainClassifier params
        c.samples_per_class = 16
        c.batch_size = 64
        c.seed = 0
        return c

    def __init__(self, generator, mesh, e):
        from flax import serialization

        self.generator, self.mesh, self.e = generator, mesh, e
        if not e.classifier_params:
            raise ValueError("class_conditional.classifier_params is empty: give the domain classifier's weights")
        with open(e.classifier_params, "rb") as f:
            params = serialization.msgpack_restore(f.read())
        net = DomainClassifier(generator.num_classes, params["conv0_0"]["kernel"].shape[-1])  # width from the file
        self.params = jax.device_put(params, NamedSharding(mesh, P()))
        self._classify = jax.jit(lambda p, x: net.apply({"params": p}, x))
        self._real = None

    def real_features(self):
        if self._real is None:
            from jax.experimental import multihost_utils

            feats = []
            for b in eval_splits.batches(self.e.data, self.mesh):
                _, f = self._classify(self.params, _quantize(b["images"], jnp.round))
                f, valid = multihost_utils.process_allgather((f, b["valid"]), tiled=True)
                feats.append(np.asarray(f)[np.asarray(valid)])
            self._real = np.concatenate(feats).astype(np.float64)
        return self._real

    def run(self, params) -> dict:
        from jax.experimental import multihost_utils

        g, e = self.generator, self.e
        labels_all = np.repeat(np.arange(g.num_classes), e.samples_per_class).astype(np.int32)
        rng = np.random.default_rng(e.seed)
        place = lambda a: jax.device_put(a, sharding.batch_sharding(self.mesh, a.ndim))  # noqa: E731
        hits, feats = 0, []
        for start in range(0, len(labels_all), e.batch_size):
            labels = labels_all[start:start + e.batch_size]
            n = len(labels)
            labels = np.concatenate([labels, np.zeros(e.batch_size - n, np.int32)])
            noise = rng.standard_normal((e.batch_size, *g.latent_shape)).astype(np.float32)
            images = g.images(params, place(noise), place(labels))
            logits, f = self._classify(self.params, jnp.floor(255 * images) / 255)
            logits, f = multihost_utils.process_allgather((logits, f), tiled=True)
            hits += int(np.sum(np.argmax(np.asarray(logits)[:n], -1) == labels[:n]))
            feats.append(np.asarray(f, np.float64)[:n])
        fake, real = np.concatenate(feats), self.real_features()
        return {"accuracy": hits / len(labels_all),
                "frechet": fid.frechet_distance(fake.mean(0), np.cov(fake, rowvar=False), real.mean(0),
                                                np.cov(real, rowvar=False))}


class FlowLossEvaluator:
    """The DiT's rectified-flow loss on held-out latents (`latents`: a folder from
    the `extract_latents` job on a validation split), with fixed noise and logit-normal t per
    record, so every run and every checkpoint is scored on the same draws."""

    @staticmethod
    def defaults():
        c = ml_collections.ConfigDict()
        c.latents = ""
        c.batch_size = 64
        c.t_mu, c.t_sigma = 0.0, 1.0
        c.seed = 0
        return c

    def __init__(self, generator, mesh, e):
        if not e.latents:
            raise ValueError("flow_loss.latents is empty: give a folder of held-out latents (extract_latents)")
        self.generator, self.mesh, self.e = generator, mesh, e
        meta = latents_lib.read_meta(e.latents)
        import grain

        source = grain.sources.ArrayRecordDataSource(latents_lib.shard_paths(e.latents))
        self.z = np.stack([latents_lib.decode_record(source[i], meta["shape"], meta["dtype"])["latent"]
                           for i in range(len(source))])
        self.y = np.stack([latents_lib.decode_record(source[i], meta["shape"], meta["dtype"])["label"]
                           for i in range(len(source))])
        model, channels = generator.model, generator.model.in_channels

        def losses(params, z, y, x0, t):
            x1 = (z - generator.mean) / generator.std * generator.multiplier
            v = model.apply({"params": params}, objectives.interpolate(x0, x1, t), t, y)[..., :channels]
            return objectives.flow_loss(v, x0, x1)

        self._losses = jax.jit(losses)

    def run(self, params) -> dict:
        e = self.e
        rng = jax.random.key(e.seed)
        total = 0.0
        for start in range(0, len(self.z), e.batch_size):
            z, y = self.z[start:start + e.batch_size], self.y[start:start + e.batch_size]
            r_noise, r_t = jax.random.split(jax.random.fold_in(rng, start))
            x0 = jax.random.normal(r_noise, z.shape)
            t = objectives.sample_logit_normal_t(r_t, (len(z),), e.t_mu, e.t_sigma)
            total += float(jnp.sum(self._losses(params, z, y, x0, t)))
        return {"loss": total / len(self.z)}
