"""Entry point: `python -m vtp_jax.main --config=configs/X.py --workdir=DIR [--config.a.b=v ...]`.

`config.job` names the job (`vtp_jax.jobs.JOBS`: pretrain, stage2, eval, extract_latents, dit,
sample, study); the runner does the rest.

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

from vtp_jax import jobs
from vtp_jax.checkpoints.released import CheckpointError
from vtp_jax.config import ConfigError
from vtp_jax.train import aot, checkpointing

config_flags.DEFINE_config_file("config", None, "configs/*.py file", lock_config=True)
flags.DEFINE_string("workdir", None, "logs, reconstructions and checkpoints (local path or gs://)")
flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process without auto-detection)")
flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator)")
flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator)")
flags.DEFINE_bool("distributed", None, "jax.distributed.initialize() with auto-detection (TPU VMs, SLURM, MPI); "
                  "by default whenever the environment shows more than one process")
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
    """More than one process by the environment: a multi-host TPU slice (its worker list, or a
    multi-slice run), a SLURM job of several tasks, an MPI launch, or a coordinator address given
    the JAX way. One process never initialises anything."""
    env = os.environ
    return (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or "," in env.get("TPU_WORKER_HOSTNAMES", "") or int(env.get("MEGASCALE_NUM_SLICES", "1")) > 1
            or "JAX_COORDINATOR_ADDRESS" in env)


def main(argv):
    del argv
    if FLAGS.config.get("train", {}).get("compile_for"):
        # The compile plan needs no accelerator and must not take one (on a TPU VM, host 0 plans on its
        # CPU; elsewhere JAX would first try libtpu's TPU backend): one process, the CPU.
        jax.config.update("jax_platforms", "cpu")
    else:
        _maybe_initialize_distributed()
    logging.info("process %d of %d, %d devices (%d local)", jax.process_index(), jax.process_count(),
                 jax.device_count(), jax.local_device_count())
    try:
        jobs.run(FLAGS.config, FLAGS.workdir)
    except (ConfigError, CheckpointError, FileNotFoundError,  # bad input: the message, no traceback
            checkpointing.RunError, FloatingPointError,  # a locked workdir, unusable checkpoints, divergence
            aot.DoesNotFit) as e:  # the compile plan (train.compile_for): the step needs more memory than a chip has
        logging.error("%s", e)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
