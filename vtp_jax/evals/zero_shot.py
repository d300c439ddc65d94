"""Zero-shot classification as OpenCLIP and the release score it: prompt-ensembled class weights,
100 x cosine logits, top-k counts.

Counts (not accuracies) come out, so an evaluator can stream batches, pad the last one and sum
across devices; a padding row never counts.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vtp_jax.data import eval_splits, procedural, sources, tokenizer
from vtp_jax.models.vtp import VTP

__all__ = ["imagenet_classnames", "openai_templates", "procedural_prompts", "classifier_weights",
           "zero_shot_logits", "topk_correct"]


@functools.cache
def imagenet_classnames() -> tuple[str, ...]:
    """OpenCLIP's 1000 ImageNet class names (IMAGENET_CLASSNAMES), in label order."""
    return tuple(sources.imagenet_class_names())


@functools.cache
def openai_templates() -> tuple[str, ...]:
    """The 80 prompt templates of OpenAI's CLIP ImageNet ensemble; `{}` stands for the class."""
    return sources.asset_lines("openai_imagenet_templates.txt")


@functools.cache
def procedural_prompts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(class names, templates) for the procedural dataset's 64 (colour, shape) classes.

    Class i is procedural.CLASS_NAMES[i] ("red circle", ...), whose label is procedural.label_of;
    the 24 templates are the caption grammar of a one-object scene (size, optional "striped",
    background), so every such caption is one of its class's prompts."""
    fills = {"solid": "", "striped": "striped "}  # captions name only the striped fill
    templates = tuple(f"a {size} {fills[fill]}{{}} on a {background} background"
                      for size in procedural.SIZES for fill in procedural.FILLS
                      for background in procedural.BACKGROUNDS)
    return procedural.CLASS_NAMES, templates


def classifier_weights(encode_text: Callable, tokenize: Callable[[Sequence[str]], np.ndarray],
                       classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256):
    """(C, E) float32 class weights: every prompt embedded, L2-normalized, averaged per class,
    renormalized (OpenCLIP's `build_zero_shot_classifier`, which the release uses).

    `tokenize(list of str) -> (n, L)` ids and `encode_text(ids) -> (n, E)` embeddings. Prompts go
    in batches of exactly `batch_size` (the last one padded by repeating its last prompt), so a
    jitted `encode_text` compiles once."""
    if not classnames or not templates:
        raise ValueError(f"classifier_weights needs class names and templates, got "
                         f"{len(classnames)} and {len(templates)}")
    prompts = [t.format(c) for c in classnames for t in templates]
    owner = np.repeat(np.arange(len(classnames)), len(templates))
    sums = None
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = np.asarray(tokenize(chunk))
        ids = np.concatenate([ids, np.repeat(ids[-1:], batch_size - len(chunk), axis=0)])
        emb = np.asarray(encode_text(ids), np.float32)[:len(chunk)]
        if emb.ndim != 2:
            raise ValueError(f"encode_text must return (n, E) embeddings, got shape {emb.shape}")
        emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
        sums = np.zeros((len(classnames), emb.shape[1]), np.float32) if sums is None else sums
        np.add.at(sums, owner[start:start + len(chunk)], emb)
    means = sums / len(templates)
    return jnp.asarray(means / np.linalg.norm(means, axis=-1, keepdims=True))


def zero_shot_logits(image_emb, weights):
    """(B, C) = 100 x cosine(image, class); the image embeddings are L2-normalized here (a no-op
    for the release's already normalized features), the weights come normalized."""
    img = image_emb.astype(jnp.float32)
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    return 100.0 * jnp.matmul(img, weights.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)


def topk_correct(logits, labels, valid, ks: Sequence[int] = (1, 5)):
    """(len(ks),) int32: how many valid rows have their label among the top-k logits, per k.

    A row's rank is its label's position in a stable descending sort (ties go to the lower class
    index, as argmax and lax.top_k break them); rows with valid False never count, nor do rows
    whose label logit is NaN."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or valid.shape != labels.shape:
        raise ValueError(f"topk_correct needs logits (B, C), labels (B,) and valid (B,), got "
                         f"{logits.shape}, {labels.shape} and {valid.shape}")
    num_classes = logits.shape[1]
    label = jnp.clip(labels, 0, num_classes - 1)[:, None]
    own = jnp.take_along_axis(logits, label, axis=1)
    ahead = (logits > own) | ((logits == own) & (jnp.arange(num_classes) < label))
    rank = jnp.where(jnp.isnan(own[:, 0]), num_classes, jnp.sum(ahead, axis=1))
    hits = (rank[None, :] < jnp.asarray(ks)[:, None]) & valid[None, :]
    return jnp.sum(hits, axis=1, dtype=jnp.int32)


class Evaluator:
    """Zero-shot top-1 / top-5 of a tokenizer's CLIP towers on a split (VTP's protocol: images
    squashed to the size, cls -> visual_proj -> L2 norm; class weights from prompt ensembles)."""

    @staticmethod
    def defaults():
        import ml_collections

        c = ml_collections.ConfigDict()
        c.classes = "imagenet"  # 'imagenet' (OpenCLIP names x 80 OpenAI templates) | 'procedural'
        c.data = ml_collections.ConfigDict({"crop": "squash"})
        return c

    def __init__(self, model, mesh, e):
        from absl import logging

        if e.classes not in ("imagenet", "procedural"):
            raise ValueError(f"zero_shot.classes={e.classes!r}: expected 'imagenet' or 'procedural'")
        self.e, self.mesh = e, mesh
        self.enabled = bool(model.config.text.depth)
        if not self.enabled:
            logging.warning("zero_shot: the tokenizer has no text tower; zero-shot is not measured")
            return
        self.prompts = (imagenet_classnames(), openai_templates()) if e.classes == "imagenet" else procedural_prompts()
        context = model.config.text.context_length
        self.tokenize = lambda texts: tokenizer.tokenize(list(texts), context)  # noqa: E731
        self._text = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method=VTP.clip_text))

        def counts(params, weights, images, labels, valid):
            feats = model.apply({"params": params}, images, method=VTP.encode_features)
            emb = model.apply({"params": params}, feats, method=VTP.clip_image)
            return topk_correct(zero_shot_logits(emb, weights), labels, valid)

        self._counts = jax.jit(counts)

    def run(self, params) -> dict:
        if not self.enabled:
            return {}
        weights = classifier_weights(lambda ids: self._text(params, ids), self.tokenize, *self.prompts)
        hits, n = np.zeros(2), 0
        for b in eval_splits.batches(self.e.data, self.mesh, name="zero_shot"):
            hits += np.asarray(jax.device_get(self._counts(params, weights, b["images"], b["labels"], b["valid"])))
            n += int(jax.device_get(b["valid"].sum()))
        return {"top1": hits[0] / max(n, 1), "top5": hits[1] / max(n, 1)}
