"""Entry point: `python -m vtp_jax.main --config=configs/X.py --workdir=DIR [--config.a.b=v ...]`.

`config.job` names the job (pre-training, stage 2, the DiT, evaluation); the runner does the rest.

Multi-process runs (TPU pods, SLURM, or `launch/local_multiprocess.sh`) call
`jax.distributed.initialize` first: with no flags JAX detects the cluster (TPU, SLURM, ...);
`--coordinator/--num_processes/--process_id` set it explicitly.
"""
from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "configs/*.py file", lock_config=True)
flags.DEFINE_string("workdir", None, "logs, reconstructions and checkpoints (local path or gs://)")
flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process without auto-detection)")
flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator)")
flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator)")
flags.DEFINE_bool("distributed", None, "force jax.distributed.initialize() with auto-detection")
FLAGS = flags.FLAGS


def _maybe_initialize_distributed():
    if FLAGS.coordinator:
        if FLAGS.num_processes is None or FLAGS.process_id is None:
            raise app.UsageError("--coordinator needs --num_processes and --process_id")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; harmless on GPU/TPU
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed or (FLAGS.distributed is None and _in_cluster()):
        jax.distributed.initialize()


def _in_cluster() -> bool:
    """A multi-host TPU slice or a SLURM job of more than one task."""
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ[
        "TPU_WORKER_HOSTNAMES"]


def main(argv):
    del argv
    _maybe_initialize_distributed()
    logging.info("process %d of %d, %d devices (%d local)", jax.process_index(), jax.process_count(),
                 jax.device_count(), jax.local_device_count())
    from vtp_jax.checkpoints.released import CheckpointError
    from vtp_jax.train import checkpointing, runner

    try:
        if FLAGS.config.job == "extract_latents":  # a data job: no training state, no steps
            from vtp_jax.data import latents

            latents.extract(FLAGS.config, FLAGS.workdir)
        elif FLAGS.config.job == "study":  # runs other jobs
            from vtp_jax import study

            study.run(FLAGS.config, FLAGS.workdir)
        else:
            runner.run(FLAGS.config, FLAGS.workdir)
    except (runner.ConfigError, CheckpointError, FileNotFoundError,  # bad input: the message, no traceback
            checkpointing.RunError, FloatingPointError) as e:  # a locked workdir, unusable checkpoints, divergence
        logging.error("%s", e)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
