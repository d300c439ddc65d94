"""What every evaluator shares: the registry by `type` and the fields of an entry.

big_vision's shape: `config.evals.<name> = dict(type=..., every=..., ...)`. The runner builds each
entry on the job's `eval_target` (the VTP module for tokenizer metrics, the DiT job's generator for
gFID) and calls `run(params) -> {metric: value}` every `every` steps and at the end of the run.
Metrics are logged as `<prefix>/<metric>`, the prefix being the entry's name unless it sets one
(reconstruction metrics default to none: `psnr`, `ssim`, `lpips`, `rfid`).

Data: every evaluator reads its split through `vtp_jax.data.eval_splits` (`entry.data`).
"""
from __future__ import annotations

import importlib

import ml_collections
from absl import logging

from vtp_jax import config as config_lib
from vtp_jax import paths

TYPES = {
    "reconstruction": "vtp_jax.evals.reconstruction:Evaluator",
    "zero_shot": "vtp_jax.evals.zero_shot:Evaluator",
    "linear_probe": "vtp_jax.evals.probes:LinearProbe",
    "knn": "vtp_jax.evals.probes:KNN",
    "latent_structure": "vtp_jax.evals.latent_structure:Evaluator",
    "generation": "vtp_jax.evals.generation:GenerationEvaluator",
    "class_conditional": "vtp_jax.evals.generation:ClassConditionalEvaluator",
    "flow_loss": "vtp_jax.evals.generation:FlowLossEvaluator",
}


def entry_defaults(kind: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.type = kind
    c.every = 0  # steps between runs during training (0: only at the end)
    c.prefix = ml_collections.FieldReference(None, field_type=str)  # metric names: '<prefix>/<metric>'
    c.data = config_lib.eval_data_config()
    c.update(evaluator_class(kind).defaults())
    return c


def evaluator_class(kind: str):
    module, name = TYPES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def entry(kind: str, **fields) -> ml_collections.ConfigDict:
    """An entry of `config.evals` for configs/*.py: `fields` over every default of evaluator type
    `kind`, so that any of its fields can be overridden from the command line
    (--config.evals.<name>.<field>=...)."""
    return resolved(ml_collections.ConfigDict(dict(type=kind, **fields)))


def resolved(config_entry: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
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
        d = resolved(e).data
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
        e = resolved(e)
        ev = evaluator_class(e.type)(target, mesh, e)
        ev.every, ev.prefix = e.every, name if e.prefix is None else e.prefix
        out[name] = ev
    return out


def missing_weights(name: str, what: str, path: str, field: str) -> bool:
    """True (and a warning saying how to get them) when an optional metric's weights are absent."""
    if path and paths.isfile(path):
        return False
    logging.warning("%s: no %s weights (%s=%r): that metric is skipped, the others still run. See docs/evaluation.md "
                    "for how to convert them.", name, what, field, path)
    return True
