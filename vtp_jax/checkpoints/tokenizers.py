"""A tokenizer from wherever a job is pointed at one, and back to the release format.

Jobs that read a trained tokenizer (eval, stage 2, extract_latents, the DiT's decoder) take either
a release-format folder (config.json + model.safetensors: a released VTP or a run's `export/`) or
a training workdir (its config.json and latest orbax checkpoint); `load_tokenizer` opens both.
"""
from __future__ import annotations

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from vtp_jax import config as config_lib
from vtp_jax import paths
from vtp_jax.checkpoints import hub, integrity, released


def is_release_folder(path: str) -> bool:
    return paths.isfile(paths.join(path, "model.safetensors")) or not paths.isdir(paths.join(path, "checkpoints"))


def load_tokenizer(path: str, field: str = "eval.checkpoint"):
    """(model config, float32 params on host) of a release folder or a training workdir; `field`
    is the config field that named `path`, for the error a user can act on. A Hugging Face hub id
    ("MiniMaxAI/VTP-Large-f16d64") is resolved to its downloaded folder."""
    path = hub.resolve(path, field)
    if not paths.isdir(path):
        raise FileNotFoundError(f"{field}={path!r} is not a folder: give a release-format folder (a run's export/, "
                                f"a released VTP) or a training workdir (--config.{field}=DIR)")
    if is_release_folder(path):
        return released.load_release(path)
    return load_workdir(path)


def tokenizer_config(path: str, field: str = "eval.checkpoint") -> ml_collections.ConfigDict:
    """The model config of what `load_tokenizer` would load, from its config.json alone (a hub id
    fetches only that file): the architecture the compile plan builds, no weights read."""
    path = hub.resolve(path, field, files=["config.json"])
    cfg_path = paths.join(path, "config.json")
    if not paths.isfile(cfg_path):
        raise FileNotFoundError(f"{field}={path!r}: no config.json there: give a release-format folder (a run's "
                                f"export/, a released VTP) or a training workdir (--config.{field}=DIR)")
    if is_release_folder(path):
        return released.read_release_config(cfg_path)
    return _workdir_model_config(cfg_path)


def _workdir_model_config(cfg_path: str) -> ml_collections.ConfigDict:
    """The model config of a training workdir's config.json: today's schema, the run's values
    (one ConfigError naming every mistyped field)."""
    schema = ml_collections.ConfigDict(dict(model=config_lib.model_config(), objectives=config_lib.objectives_config()))
    return config_lib.model_config_for(config_lib.read_saved(cfg_path, schema, ("model", "objectives")))


def load_workdir(workdir: str):
    """The model config and student params of a training workdir's latest checkpoint."""
    cfg_path = paths.join(workdir, "config.json")
    if not paths.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: a training workdir holds config.json and checkpoints/")
    model_cfg = _workdir_model_config(cfg_path)
    manager = ocp.CheckpointManager(paths.join(workdir, "checkpoints"))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint")
    path = paths.join(workdir, "checkpoints", str(step), "state")
    meta = ocp.StandardCheckpointer().metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    state = ocp.StandardCheckpointer().restore(path, target)
    problem = integrity.verify_step(paths.dirname(path), state)
    if problem:
        raise released.CheckpointError(f"{workdir}/checkpoints step {step}: {problem}")
    params = state["params"]
    released.check_finite({"/".join(k): v for k, v in released._flatten(params).items()}, f"{path} (params)",
                          "a diverged run? restore an earlier step")
    logging.info("loaded step %d of %s", step, workdir)
    return model_cfg, jax.tree.map(np.asarray, params)


def export_tokenizer(model_cfg, params, folder: str, image_size: int) -> None:
    """The tokenizer in the release format: `vtp_jax.load_pretrained(folder)` (and the official
    PyTorch code) open it. Parts the release has no place for (the DINO head) are left out.
    Gathered from every host, written by process 0."""
    params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        try:
            released.export_release(model_cfg, params, folder, image_size)
            logging.info("exported the model to %s (vtp_jax.load_pretrained opens it)", folder)
        except released.CheckpointError as e:
            logging.warning("no release-format export: %s", e)
