"""Job `eval`: the evaluators of `config.evals` on a tokenizer checkpoint, once.

    python -m vtp_jax.main --config=configs/eval_demo.py --config.eval.checkpoint=DIR --workdir=W

DIR is a release-format folder (config.json + model.safetensors: a released VTP or a run's
`export/`) or a training workdir (its config.json and latest checkpoint). The runner writes
W/metrics.json (flat keys such as `psnr`, `zero_shot/top1`) and the same scalars to TensorBoard.
"""
from __future__ import annotations

import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vtp_jax.models.vtp import VTP
from vtp_jax.train import runner


@flax.struct.dataclass
class EvalState:
    params: dict


def validate(config, n_batch_shards: int, n_processes: int = 1) -> list[str]:
    errs = []
    if not config.eval.checkpoint:
        errs.append("eval.checkpoint is empty: give a release-format folder (e.g. a run's export/) or a training "
                    "workdir (--config.eval.checkpoint=DIR)")
    for name, e in config.evals.items():
        b = e.get("data", {}).get("batch_size", None)
        if b is not None and (b % n_batch_shards or b % n_processes):
            errs.append(f"evals.{name}.data.batch_size={b} is not divisible by the {n_batch_shards} batch shards "
                        f"of the mesh and the {n_processes} processes")
    if not config.evals:
        errs.append("evals is empty: nothing to evaluate")
    return errs


def is_release_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model.safetensors")) or not os.path.isdir(os.path.join(path, "checkpoints"))


def load_tokenizer(path: str):
    """(model config, float32 params on host) of a release folder or a training workdir."""
    from vtp_jax.checkpoints import released

    if not os.path.isdir(path):
        raise FileNotFoundError(f"eval.checkpoint={path!r} is not a folder")
    if is_release_folder(path):
        return released.load_release(path)
    return load_workdir(path)


def load_workdir(workdir: str):
    """The model config and student params of a training workdir's latest checkpoint."""
    import orbax.checkpoint as ocp

    from vtp_jax import config as config_lib
    from vtp_jax.train import pretrain

    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: a training workdir holds config.json and checkpoints/")
    with open(cfg_path) as f:
        saved = ml_collections.ConfigDict(json.load(f))
    model = config_lib.model_config()  # today's schema, the run's values
    model.update(saved.model)
    model_cfg = pretrain.model_config_for(ml_collections.ConfigDict(dict(model=model, objectives=saved.objectives)))
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint")
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    meta = ocp.StandardCheckpointer().metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    state = ocp.StandardCheckpointer().restore(path, target)
    from vtp_jax.checkpoints import released
    from vtp_jax.train import checkpointing

    problem = checkpointing.verify_step(os.path.dirname(path), state)
    if problem:
        raise released.CheckpointError(f"{workdir}/checkpoints step {step}: {problem}")
    params = state["params"]
    released.check_finite({"/".join(k): v for k, v in released._flatten(params).items()}, f"{path} (params)",
                          "a diverged run? restore an earlier step")
    logging.info("evaluating step %d of %s", step, workdir)
    return model_cfg, jax.tree.map(np.asarray, params)


def make_job(config: ml_collections.ConfigDict, mesh) -> runner.Job:
    model_cfg, params = load_tokenizer(config.eval.checkpoint)
    model = VTP(model_cfg)
    size = 4 * model_cfg.patch_size

    def init(rng):
        return EvalState(params=model.init(rng, jnp.zeros((1, size, size, 3)))["params"])

    def start(state):
        placed = jax.tree.map(lambda old, new: jax.device_put(jnp.asarray(new, old.dtype), old.sharding),
                              state.params, params)
        return state.replace(params=placed)

    return runner.Job(config=config, init=init, start=start, eval_target=model, model=model)
