"""What every evaluator shares: the registry by `type`, the fields of an entry, and its data.

big_vision's shape: `config.evals.<name> = dict(type=..., every=..., ...)`. The runner builds each
entry on the job's `eval_target` (the VTP module for tokenizer metrics, the DiT job's generator for
gFID) and calls `run(params) -> {metric: value}` every `every` steps and at the end of the run.
Metrics are logged as `<prefix>/<metric>`, the prefix being the entry's name unless it sets one
(reconstruction metrics default to none: `psnr`, `ssim`, `lpips`, `rfid`).

Data: every evaluator reads the same kind of split (procedural, ArrayRecord shards or TFDS) through
`vtp_jax.data.pipeline.make_eval_iterator`, each process its 1/P, as global batches sharded over
the mesh's batch axes; the last batch is padded (`valid`), and every process runs the same
number of batches so the collectives line up.
"""
from __future__ import annotations

import importlib
import math
from typing import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from vtp_jax import config as config_lib

TYPES = {
    "reconstruction": "vtp_jax.evals.reconstruction:Evaluator",
    "zero_shot": "vtp_jax.evals.zero_shot:Evaluator",
    "linear_probe": "vtp_jax.evals.probes:LinearProbe",
    "knn": "vtp_jax.evals.probes:KNN",
    "generation": "vtp_jax.evals.generation:GenerationEvaluator",
    "class_conditional": "vtp_jax.evals.generation:ClassConditionalEvaluator",
    "flow_loss": "vtp_jax.evals.generation:FlowLossEvaluator",
}


def data_config() -> ml_collections.ConfigDict:
    """The split(s) an evaluator reads."""
    c = ml_collections.ConfigDict()
    c.source = "procedural"  # 'procedural' | 'array_record' | 'tfds'
    c.paths = ""  # array_record: the evaluation split's shards (glob, directory or list)
    c.train_paths = ""  # array_record: the train split (probes)
    c.tfds_name = "imagenet2012"
    c.tfds_data_dir = ""
    c.split = "validation"  # tfds split evaluated; procedural: seed procedural_seed + 1 (unseen in training)
    c.train_split = "train"  # tfds split the probes fit on; procedural: seed procedural_seed
    c.procedural_seed = 0  # the training stream's seed
    c.procedural_size = 64
    c.procedural_objects = 2  # objects per scene at most
    c.num_images = 1000  # images of the evaluated split (0: all; procedural needs a number)
    c.num_train_images = 2000  # probes: images of the train split
    c.image_size = 256
    c.crop = "center"  # 'center' (ADM, rFID / probes / DiT latents) or 'squash' (VTP's zero-shot)
    c.batch_size = 64  # global; divisible by the mesh's batch shards and the process count
    return c


def entry_defaults(kind: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.type = kind
    c.every = 0  # steps between runs during training (0: only at the end)
    c.prefix = ml_collections.FieldReference(None, field_type=str)  # metric names: '<prefix>/<metric>'
    c.data = data_config()
    c.update(evaluator_class(kind).defaults())
    return c


def evaluator_class(kind: str):
    module, name = TYPES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def entry(config_entry: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The entry over its type's defaults, nested dicts merged (fields checked by `validate`)."""
    def merge(base, over):
        for k, v in over.items():
            if isinstance(v, (dict, ml_collections.ConfigDict)) and isinstance(base.get(k), ml_collections.ConfigDict):
                merge(base[k], v)
            else:
                base[k] = tuple(v) if isinstance(v, list) else v
        return base

    return merge(entry_defaults(config_entry.type), config_entry)


def validate(config: ml_collections.ConfigDict) -> list[str]:
    errs = []
    for name, e in config.get("evals", {}).items():
        kind = e.get("type", None)
        if kind not in TYPES:
            errs.append(f"evals.{name}.type={kind!r}: expected one of {sorted(TYPES)}")
            continue
        try:
            config_lib.check_fields(e, entry_defaults(kind), where=f"evals.{name}")
        except ValueError as err:
            errs.append(str(err))
            continue
        d = entry(e).data
        if d.source not in ("procedural", "array_record", "tfds"):
            errs.append(f"evals.{name}.data.source={d.source!r}: expected 'procedural', 'array_record' or 'tfds'")
        if d.source == "procedural" and not d.num_images:
            errs.append(f"evals.{name}.data.num_images=0: the procedural set is unbounded, give a number")
        if d.crop not in ("center", "squash"):
            errs.append(f"evals.{name}.data.crop={d.crop!r}: expected 'center' or 'squash'")
    return errs


def build(config: ml_collections.ConfigDict, target, mesh) -> dict:
    """{name: evaluator} for config.evals."""
    out = {}
    for name, e in config.get("evals", {}).items():
        e = entry(e)
        ev = evaluator_class(e.type)(target, mesh, e)
        ev.every, ev.prefix = e.every, name if e.prefix is None else e.prefix
        out[name] = ev
    return out


# ------------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------------
class _Head:
    """The first n records of a random-access source."""

    def __init__(self, source, n: int):
        self.source, self.n = source, min(n, len(source)) if n else len(source)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]


def make_source(d: ml_collections.ConfigDict, train: bool = False):
    from vtp_jax.data import sources

    n = d.num_train_images if train else d.num_images
    if d.source == "procedural":
        return sources.ProceduralSource(d.procedural_seed + (0 if train else 1), d.procedural_size, n,
                                        max_objects=d.procedural_objects)
    if d.source == "array_record":
        paths = d.train_paths if train else d.paths
        if not paths:
            raise ValueError(f"data.{'train_paths' if train else 'paths'} is empty: give the split's ArrayRecord shards")
        return _Head(sources.array_record_source(paths), n)
    return _Head(sources.TFDSSource(d.tfds_name, d.train_split if train else d.split, d.tfds_data_dir or None), n)


def batches(d: ml_collections.ConfigDict, mesh, train: bool = False) -> Iterator[dict]:
    """Global batches {images (ImageNet-normalized), labels, valid} of a split, sharded over the
    mesh's batch axes; every process yields the same number of them."""
    from vtp_jax.data import pipeline
    from vtp_jax.train import sharding

    source = make_source(d, train)
    n_proc, pid = jax.process_count(), jax.process_index()
    local = d.batch_size // n_proc
    n_batches = math.ceil(math.ceil(len(source) / n_proc) / local)
    seen = 0
    for b in pipeline.make_eval_iterator(source, image_size=d.image_size, batch_size=local, crop=d.crop,
                                         process_index=pid, process_count=n_proc):
        seen += 1
        yield sharding.global_batch(b, mesh)
    empty = {"images": np.zeros((local, d.image_size, d.image_size, 3), np.float32),
             "labels": np.full((local,), -1, np.int32), "valid": np.zeros((local,), bool)}
    for _ in range(n_batches - seen):  # shorter shares (or skipped records) pad with empty batches
        yield sharding.global_batch(empty, mesh)


def missing_weights(name: str, what: str, path: str, field: str) -> bool:
    """True (and a warning saying how to get them) when an optional metric's weights are absent."""
    import os

    if path and os.path.isfile(path):
        return False
    logging.warning("%s: no %s weights (%s=%r): that metric is skipped, the others still run. See README "
                    "'Evaluation' for how to convert them.", name, what, field, path)
    return True
