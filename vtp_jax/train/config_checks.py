"""Config values that no job may run with, checked before anything compiles (runner.validate).

The runner's intervals and counts (a 0 that would divide by zero after compiling, a
keep_checkpoints=0 that deletes every checkpoint right after writing it, a negative step count)
and the enumerated model options (a dtype such as 'bf16' that would otherwise be a KeyError deep
inside the model)."""
from __future__ import annotations

import numbers

import ml_collections

# field: (smallest allowed value, what the field means)
TRAIN_COUNTS = {
    "steps": (0, "the step the run ends at"),
    "log_every": (1, "steps between metric writes"),
    "checkpoint_every": (1, "steps between checkpoints"),
    "keep_checkpoints": (1, "checkpoints kept; 0 would delete each one right after writing it"),
    "images_every": (0, "steps between image writes; 0: none"),
    "max_nonfinite": (1, "non-finite steps in a row before the run aborts"),
    "profile_steps": (0, "steps profiled; 0: none"),
}

CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots"),
    "model.attention": ("xla", "cudnn"),
    "model.mlp": ("swiglu", "gelu"),
    "model.norm": ("rmsnorm", "layernorm"),
    "model.clip_feat": ("cls", "pooled"),
    "model.decoder.mlp": ("swiglu", "gelu"),
    "model.decoder.norm": ("rmsnorm", "layernorm"),
    "dit.dtype": ("float32", "bfloat16"),
    "dit.remat": ("none", "full", "dots"),
    "latents.dtype": ("float16", "float32"),
}


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            return _ABSENT
        node = node[part]
    return node


_ABSENT = object()


def errors(config: ml_collections.ConfigDict) -> list[str]:
    """One line per bad value, naming the field, the value and what is expected."""
    errs = []
    t = config.get("train", {})
    for name, (lo, meaning) in TRAIN_COUNTS.items():
        if name not in t:
            continue
        v = t[name]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
            errs.append(f"train.{name}={v!r}: expected an integer >= {lo} ({meaning})")
    if "divergence_factor" in t:
        f = t.divergence_factor
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not (f == 0 or f > 1):
            errs.append(f"train.divergence_factor={f!r}: expected 0 (off) or a number > 1")
    for path, allowed in CHOICES.items():
        v = _get(config, path)
        if v is not _ABSENT and v not in allowed:
            errs.append(f"{path}={v!r}: expected one of {', '.join(repr(a) for a in allowed)}")
    return errs
