"""Job `eval`: the evaluators of `config.evals` on a tokenizer checkpoint, once.

    python -m vtp_jax.main --config=configs/eval_demo.py --config.eval.checkpoint=DIR --workdir=W

DIR is a release-format folder (config.json + model.safetensors: a released VTP or a run's
`export/`) or a training workdir (its config.json and latest checkpoint). The runner writes
W/metrics.json (flat keys such as `psnr`, `zero_shot/top1`) and the same scalars to TensorBoard.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import ml_collections

from vtp_jax import config as config_lib
from vtp_jax.checkpoints import tokenizers
from vtp_jax.models.vtp import VTP
from vtp_jax.train import runner


@flax.struct.dataclass
class EvalState:
    params: dict


def default_config() -> ml_collections.ConfigDict:
    """What to evaluate; `evals` says how."""
    c = config_lib.base_config("eval")
    c.eval = ml_collections.ConfigDict()
    c.eval.checkpoint = ""  # a release-format folder (e.g. a run's export/) or a training workdir
    return c


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


def make_job(config: ml_collections.ConfigDict, mesh, workdir: str | None = None, abstract: bool = False) -> runner.Job:
    if abstract:  # no train step: nothing for the compile plan to compile
        return runner.Job(config=config, init=None)
    model_cfg, params = tokenizers.load_tokenizer(config.eval.checkpoint, field="eval.checkpoint")
    model = VTP(model_cfg)
    size = 4 * model_cfg.patch_size

    def init(rng):
        return EvalState(params=model.init(rng, jnp.zeros((1, size, size, 3)))["params"])

    def start(state):
        placed = jax.tree.map(lambda old, new: jax.device_put(jnp.asarray(new, old.dtype), old.sharding),
                              state.params, params)
        return state.replace(params=placed)

    return runner.Job(config=config, init=init, start=start, eval_target=model, model=model)
