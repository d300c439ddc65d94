"""gFID, sFID, Inception Score and improved precision / recall of a class-conditional generator
(the DiT job's `Generator`): the five numbers of ADM's evaluator (guided-diffusion's evaluations).

N samples (labels uniform at random, noise seeded) are generated batch by batch with the batch
sharded over the mesh, quantized as the release does (truncated uint8), and only their Inception
statistics are kept (streamed; the 2048-d pool features too when precision / recall are on). The
reference is a file (ADM's VIRTUAL_imagenet256_labeled.npz: mu / sigma, mu_s / sigma_s, and its
images arr_0, which precision / recall need; or our own from `fid.save_stats`); what the file
lacks comes from the real images of a split read here (procedural or any dataset), computed once.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vtp_jax import images, objectives, paths, sharding
from vtp_jax.data import eval_splits, files
from vtp_jax.data import latents as latents_lib
from vtp_jax.evals import evaluator, fid
from vtp_jax.models.classifier import DomainClassifier

GUIDANCE_FIELDS = ("cfg_scale", "cfg_interval_start", "cfg_channels")


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


def _guidance_defaults(c: ml_collections.ConfigDict):
    """An evaluator's own guidance fields; None: the DiT job's dit.sample. cfg_channels k >= the
    latent channels: all."""
    c.cfg_scale = ml_collections.FieldReference(None, field_type=float)
    c.cfg_interval_start = ml_collections.FieldReference(None, field_type=float)
    c.cfg_channels = ml_collections.FieldReference(None, field_type=int)


def _guided(generator, e):
    """The generator with the entry's guidance fields that are set."""
    overrides = {k: e[k] for k in GUIDANCE_FIELDS if e[k] is not None}
    return generator.with_sample(**overrides) if overrides else generator


class GenerationEvaluator:
    @staticmethod
    def defaults():
        c = ml_collections.ConfigDict()
        c.num_samples = 10_000  # 50k for the paper's protocol
        c.batch_size = 64  # global samples per generation step
        c.inception_params = ""  # `python -m vtp_jax.checkpoints.torch_convert inception` output
        c.reference_stats = ""  # .npz with mu, sigma (ADM's: + mu_s, sigma_s, arr_0); '' = real images of `data`
        c.sfid = True  # sFID on the spatial features (reference: the file's mu_s / sigma_s, else `data`)
        c.precision_recall = True  # improved precision / recall (real features: the file's arr_0, else `data`)
        c.nearest_k = 3  # precision / recall neighbourhood (ADM: 3)
        _guidance_defaults(c)
        c.seed = 0
        return c

    def __init__(self, generator, mesh, e):
        generator = _guided(generator, e)
        self.generator, self.mesh, self.e = generator, mesh, e
        self.enabled = not evaluator.missing_weights("generation", "Inception", e.inception_params,
                                                     "inception_params")
        if not self.enabled:
            return
        replicated = NamedSharding(mesh, P())
        self.inception = jax.device_put(fid.load_inception_params(e.inception_params), replicated)
        spatial_on = e.sfid

        def stats(inception, images, valid):  # images: uint8 values / 255
            if spatial_on:
                feats, spatial = fid.inception_pool_and_spatial(inception, images)
            else:
                feats, spatial = fid.inception_features(inception, images), None
            logits = feats @ inception["fc"]["kernel"] + inception["fc"]["bias"]
            spatial = None if spatial is None else fid.batch_moments(spatial, valid)
            return fid.batch_moments(feats, valid), spatial, logits, feats

        # The weights as an argument: closed over, they would be baked into the program as constants.
        self._stats = lambda images, valid, f=jax.jit(stats): f(self.inception, images, valid)
        self._reference = None

    def _place(self, a):
        return jax.device_put(a, sharding.batch_sharding(self.mesh, a.ndim))

    def _accumulate(self, moments, spatial, feats, valid, acc):
        """Adds one batch to acc = (FeatureStats, spatial FeatureStats, [pool features of valid rows])."""
        acc[0].update(jax.device_get(moments))
        if spatial is not None:
            acc[1].update(jax.device_get(spatial))
        if self.e.precision_recall:
            acc[2].append(_valid_rows(feats, valid))

    def reference(self) -> dict:
        """The real side: mu, sigma (+ mu_s, sigma_s with sfid; pool `features` with
        precision_recall), from the file where it has them, the rest from the real images of `data`."""
        if self._reference is not None:
            return self._reference
        e, ref = self.e, {}
        if e.reference_stats:
            ref["mu"], ref["sigma"] = fid.load_reference_stats(e.reference_stats)
            with files.NpzArchive(e.reference_stats) as archive:
                names = set(archive.files)
                if e.sfid and {"mu_s", "sigma_s"} <= names:
                    ref["mu_s"], ref["sigma_s"] = fid.load_reference_stats(e.reference_stats, spatial=True)
                if e.precision_recall and "arr_0" in names:  # ADM: features of the batch's own images
                    ref["features"] = self._features_of(archive["arr_0"])
        missing = [k for k, on in (("mu", True), ("mu_s", e.sfid), ("features", e.precision_recall))
                   if on and k not in ref]
        if missing:
            acc = (fid.FeatureStats(), fid.FeatureStats(fid.SPATIAL_DIM), [])
            for b in eval_splits.batches(e.data, self.mesh, name="generation reference"):
                moments, spatial, _, feats = self._stats(_quantize(b["images"], jnp.round), b["valid"])
                self._accumulate(moments, spatial, feats, b["valid"], acc)
            real = {"mu": acc[0].mu(), "sigma": acc[0].sigma()}
            if e.sfid:
                real.update(mu_s=acc[1].mu(), sigma_s=acc[1].sigma())
            if e.precision_recall:
                real["features"] = np.concatenate(acc[2])
            ref.update({k: v for k, v in real.items() if k not in ref})
            logging.info("generation: reference %s from %d real images of %s", missing, acc[0].count, e.data.source)
        self._reference = ref
        return ref

    def _features_of(self, images_uint8) -> np.ndarray:
        """Pool features of (N, H, W, 3) uint8 images (a reference batch's arr_0)."""
        bs, out = self.e.batch_size, []
        for start in range(0, len(images_uint8), bs):
            part = np.asarray(images_uint8[start:start + bs])
            n = len(part)
            part = np.concatenate([part, np.zeros((bs - n, *part.shape[1:]), part.dtype)])
            valid = self._place(np.arange(bs) < n)
            feats = self._stats(self._place(part.astype(np.float32) / 255), valid)[3]
            out.append(_valid_rows(feats, valid))
        return np.concatenate(out)

    def run(self, params) -> dict:
        if not self.enabled:
            return {}
        g, e = self.generator, self.e
        rng = np.random.default_rng(e.seed)
        fake, logits = (fid.FeatureStats(), fid.FeatureStats(fid.SPATIAL_DIM), []), []
        t0, last = time.perf_counter(), time.perf_counter()
        for start in range(0, e.num_samples, e.batch_size):
            if time.perf_counter() - last > 30:  # sampling 50k images takes hours: say where it is
                last = time.perf_counter()
                rate = start / (last - t0)
                logging.info("generation: %d of %d samples, %.1f samples/s, ETA %.0f s", start, e.num_samples, rate,
                             (e.num_samples - start) / rate)
            n = min(e.batch_size, e.num_samples - start)
            labels = rng.integers(0, g.num_classes, e.batch_size).astype(np.int32)
            noise = rng.standard_normal((e.batch_size, *g.latent_shape)).astype(np.float32)
            images = g.images(params, self._place(noise), self._place(labels))
            truncated = jnp.floor(255 * images) / 255  # as the release writes its samples: truncated uint8
            valid = self._place(np.arange(e.batch_size) < n)
            moments, spatial, lg, feats = self._stats(truncated, valid)
            self._accumulate(moments, spatial, feats, valid, fake)
            logits.append(np.asarray(multihost_utils.process_allgather(lg, tiled=True))[:n])
        ref = self.reference()
        out = {"fid": fid.frechet_distance(fake[0].mu(), fake[0].sigma(), ref["mu"], ref["sigma"]),
               "is": inception_score(np.concatenate(logits))}
        if e.sfid:
            out["sfid"] = fid.frechet_distance(fake[1].mu(), fake[1].sigma(), ref["mu_s"], ref["sigma_s"])
        if e.precision_recall:
            out["precision"], out["recall"] = fid.precision_recall(ref["features"], np.concatenate(fake[2]),
                                                                   k=e.nearest_k)
        return out


def _valid_rows(feats, valid) -> np.ndarray:
    """The rows of a batch-sharded array where `valid`, gathered to every process."""
    from jax.experimental import multihost_utils

    feats, valid = multihost_utils.process_allgather((feats, valid), tiled=True)
    return np.asarray(feats)[np.asarray(valid)]


def _quantize(x, how):
    """ImageNet-normalized batch (what `eval_splits.batches` yields) -> uint8 values / 255."""
    return how(255 * images.denormalize(x)) / 255


def class_accuracies(predicted, labels, num_colors: int, bootstrap: int = 0, seed: int = 0) -> dict:
    """Top-1 of the (shape, colour) class and of each factor (label = shape * num_colors + colour):
    colour is low-level, shape is what the tokenizers' semantics could add. With `bootstrap`
    resamples of the samples, each accuracy's 95% percentile interval (`<name>_lo`, `<name>_hi`)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    hits = {"accuracy": predicted == labels, "shape_accuracy": predicted // num_colors == labels // num_colors,
            "color_accuracy": predicted % num_colors == labels % num_colors}
    out = {k: float(v.mean()) for k, v in hits.items()}
    if bootstrap:
        idx = np.random.default_rng(seed).integers(0, len(labels), (bootstrap, len(labels)))
        for k, v in hits.items():
            out[f"{k}_lo"], out[f"{k}_hi"] = (float(q) for q in np.percentile(v[idx].mean(1), [2.5, 97.5]))
    return out


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
        _guidance_defaults(c)
        c.bootstrap = 1000  # resamples of the samples for accuracy's 95% interval (0: none)
        c.seed = 0
        return c

    def __init__(self, generator, mesh, e):
        from flax import serialization

        generator = _guided(generator, e)
        self.generator, self.mesh, self.e = generator, mesh, e
        if not e.classifier_params:
            raise ValueError("class_conditional.classifier_params is empty: give the domain classifier's weights")
        with paths.open_file(e.classifier_params) as f:
            params = serialization.msgpack_restore(f.read())
        net = DomainClassifier(generator.num_classes, params["conv0_0"]["kernel"].shape[-1])  # width from the file
        self.num_colors = net.num_colors
        self.params = jax.device_put(params, NamedSharding(mesh, P()))
        self._classify = jax.jit(lambda p, x: net.apply({"params": p}, x))
        self._real = None

    def real_features(self):
        if self._real is None:
            feats = []
            for b in eval_splits.batches(self.e.data, self.mesh, name="class_conditional reference"):
                _, f = self._classify(self.params, _quantize(b["images"], jnp.round))
                f, valid = multihost_utils.process_allgather((f, b["valid"]), tiled=True)
                feats.append(np.asarray(f)[np.asarray(valid)])
            self._real = np.concatenate(feats).astype(np.float64)
        return self._real

    def run(self, params) -> dict:
        g, e = self.generator, self.e
        labels_all = np.repeat(np.arange(g.num_classes), e.samples_per_class).astype(np.int32)
        rng = np.random.default_rng(e.seed)
        place = lambda a: jax.device_put(a, sharding.batch_sharding(self.mesh, a.ndim))  # noqa: E731
        predicted, feats = [], []
        for start in range(0, len(labels_all), e.batch_size):
            labels = labels_all[start:start + e.batch_size]
            n = len(labels)
            labels = np.concatenate([labels, np.zeros(e.batch_size - n, np.int32)])
            noise = rng.standard_normal((e.batch_size, *g.latent_shape)).astype(np.float32)
            images = g.images(params, place(noise), place(labels))
            logits, f = self._classify(self.params, jnp.floor(255 * images) / 255)
            logits, f = multihost_utils.process_allgather((logits, f), tiled=True)
            predicted.append(np.argmax(np.asarray(logits)[:n], -1))
            feats.append(np.asarray(f, np.float64)[:n])
        fake, real = np.concatenate(feats), self.real_features()
        out = class_accuracies(np.concatenate(predicted), labels_all, self.num_colors, e.bootstrap, e.seed)
        out["frechet"] = fid.frechet_distance(fake.mean(0), np.cov(fake, rowvar=False), real.mean(0),
                                              np.cov(real, rowvar=False))
        return out


class FlowLossEvaluator:
    """The DiT's rectified-flow loss on held-out latents (`latents`: a folder from
    the `extract_latents` job on a validation split, or official latent shards), with fixed
    noise and logit-normal t per record, so every run and every checkpoint is scored on the same
    draws."""

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
        source = latents_lib.latent_source(e.latents)  # ours or official shards
        records = [source[i] for i in range(len(source))]
        self.z = np.stack([r["latent"] for r in records])
        self.y = np.stack([r["label"] for r in records])
        model, channels = generator.model, generator.model.in_channels

        def losses(params, z, y, x0, t):
            x1 = latents_lib.normalize(z, generator.mean, generator.std, generator.multiplier)
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
