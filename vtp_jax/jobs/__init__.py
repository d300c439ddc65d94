"""Every job, in one registry: `config.job` names one and `vtp_jax.train.runner` runs it.

    python -m vtp_jax.main --config=configs/X.py --workdir=W

A job module brings three functions and owns nothing another job needs:
  default_config()                                  its schema: every field it reads, with defaults
  validate(config, n_batch_shards, n_processes)     every problem of a config, as a list of lines
  make_job(config, mesh, workdir)                   a `runner.Job`: its state, step, data, hooks,
                                                    evaluation target and export, or its `run`
"""
from __future__ import annotations

import ml_collections

from vtp_jax import config as config_lib
from vtp_jax.jobs import dit, evaluate, extract_latents, pretrain, sample, stage2, study
from vtp_jax.train import aot, runner

JOBS = {
    "pretrain": pretrain,  # VTP pre-training: CLIP + DINOv2 / iBOT + reconstruction
    "stage2": stage2,  # the pixel decoder fine-tuned with a GAN, the encoder frozen
    "eval": evaluate,  # config.evals on a tokenizer checkpoint, once
    "extract_latents": extract_latents,  # a tokenizer's latents of a dataset, for the DiT
    "dit": dit,  # a LightningDiT trained on cached latents, sampled and scored
    "sample": sample,  # N samples of a DiT (workdir or official checkpoint) as samples.npz, for FID
    "study": study,  # the miniature study: understanding, spatial structure and generation
}


def get(name: str):
    """The job module called `name` (one error listing the known names otherwise)."""
    if name not in JOBS:
        raise runner.ConfigError(f"job={name!r}: expected one of {sorted(JOBS)}")
    return JOBS[name]


def default_config(name: str = "pretrain") -> ml_collections.ConfigDict:
    """Every field job `name` reads, with its default: configs/*.py start here and override."""
    return get(name).default_config()


def validate(config: ml_collections.ConfigDict, n_batch_shards: int, n_processes: int = 1) -> None:
    """`runner.validate` for the job `config.job` names: one ConfigError listing every problem."""
    runner.validate(get(config.job), config, n_batch_shards, n_processes)


def build(config: ml_collections.ConfigDict, mesh=None, workdir: str | None = None) -> runner.Trainer:
    """`runner.build` for the job `config.job` names (tests, benchmarks)."""
    return runner.build(get(config.job), config, mesh, workdir)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the job `config.job` names in `workdir`; its last metrics. With train.compile_for it
    compiles for that TPU topology instead (`aot.plan`: W/compiled.json, nothing run); an auto
    train.accum_steps / remat is chosen for this machine's devices first (`aot.resolve`)."""
    job = get(config.job)
    if config.train.get("compile_for"):
        return aot.plan(job, config, workdir)
    if config_lib.auto_fields(config):
        config = aot.resolve(job, config)
    return runner.run(job, config, workdir)
