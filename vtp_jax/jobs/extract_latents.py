"""Job `extract_latents`: a tokenizer's latents of a dataset, cached for the DiT.

    python -m vtp_jax.main --config=configs/extract_latents.py --config.latents.tokenizer=DIR --workdir=W

encodes the train split of a dataset (ImageNet via TFDS with ADM's centre crop at 256, ArrayRecord
shards or the procedural set) with a tokenizer, each image unflipped and flipped (LightningDiT
draws one of the two per sample), into W/part-<k>-of-<P>-<p>.array_record (the record format of
`vtp_jax.data.latents`): part k covers global batches [k * part_batches, (k + 1) * part_batches),
each process writes its own rows, so the batches are sharded over every device of every process.
A part is written to a temporary name and renamed when whole, so a killed extraction resumes at
the first part some process lacks. At the end W/stats.npz holds the per-channel mean and std of
min(10k, N) random unflipped latents and W/meta.json the shapes, the class count and the tokenizer.
The `dit` job runs it first when `dit.latents` is empty.
"""
from __future__ import annotations

import math
import os
import tempfile
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from jax.experimental import multihost_utils

from vtp_jax import config as config_lib
from vtp_jax import paths, sharding
from vtp_jax.checkpoints import hub, tokenizers
from vtp_jax.data import eval_splits
from vtp_jax.data import latents as latents_lib
from vtp_jax.data import procedural
from vtp_jax.models.vtp import VTP
from vtp_jax.train import runner


def default_config() -> ml_collections.ConfigDict:
    c = config_lib.base_config("extract_latents")
    c.latents = config_lib.latents_config()
    return c


def validate(config: ml_collections.ConfigDict, n_batch_shards: int, n_processes: int = 1) -> list[str]:
    c, errs = config.latents, []
    if not c.tokenizer:
        errs.append("latents.tokenizer is empty: give a release-format folder (a run's export/, a released VTP) "
                    "or a training workdir (--config.latents.tokenizer=DIR)")
    d = c.data
    if d.source == "procedural" and not d.num_train_images:
        errs.append("latents.data.num_train_images=0: the procedural set is unbounded, give a number")
    if d.batch_size % n_batch_shards or d.batch_size % n_processes:  # shards span the processes
        errs.append(f"latents.data.batch_size={d.batch_size} is not divisible by the {n_batch_shards} batch shards "
                    f"and {n_processes} processes")
    return errs


def make_job(config: ml_collections.ConfigDict, mesh, workdir: str | None = None, abstract: bool = False) -> runner.Job:
    if abstract:  # no train step: nothing for the compile plan to compile
        return runner.Job(config=config, init=None)
    return runner.Job(config=config, init=None, run=lambda: {"folder": extract(config, workdir, mesh)})


def extract(config: ml_collections.ConfigDict, workdir: str, mesh) -> str:
    """Encodes config.latents.data's train split into `workdir` (see the module docstring);
    returns the folder. Every process runs it (collectives), each writing its own files."""
    c = config.latents
    d = c.data
    n_proc, pid = jax.process_count(), jax.process_index()
    paths.makedirs(workdir)
    if paths.isfile(paths.join(workdir, latents_lib.META)):
        logging.info("latents in %s are complete", workdir)
        return workdir
    model_cfg, params = tokenizers.load_tokenizer(c.tokenizer, field="latents.tokenizer")
    model = VTP(model_cfg)
    dtype = np.dtype(c.dtype)
    given = None
    if c.stats:  # checked before hours of encoding
        try:
            given = latents_lib.load_stats(c.stats)
        except (OSError, ValueError) as e:
            raise runner.ConfigError(f"latents.stats={c.stats}: {e}") from None
        if given[0].shape != (model_cfg.latent_dim,):
            raise runner.ConfigError(f"latents.stats={c.stats} has {given[0].size} channels, the tokenizer's latents "
                                     f"{model_cfg.latent_dim}")

    @jax.jit
    def encode(params, images):
        z = model.apply({"params": params}, images, method=VTP.encode)
        z_flip = model.apply({"params": params}, images[:, :, ::-1], method=VTP.encode)
        return z, z_flip

    with jax.set_mesh(mesh), tempfile.TemporaryDirectory(prefix="vtp_jax_latents_") as local:
        params = jax.device_put(params, sharding.replicated(mesh))
        n_batches = eval_splits.num_batches(d, train=True)
        n_parts = math.ceil(n_batches / c.part_batches)
        name = lambda k: paths.join(workdir, f"part-{k:05d}-of-{n_proc:03d}-{pid:03d}.array_record")  # noqa: E731
        done = [paths.isfile(name(k)) for k in range(n_parts)]
        done = multihost_utils.process_allgather(np.array(done)).reshape(-1, n_parts).all(axis=0) if n_proc > 1 \
            else np.array(done)
        h = d.image_size // model_cfg.patch_size
        shape = (h, h, model_cfg.latent_dim)
        todo = [k for k in range(n_parts) if not done[k]]  # finished parts are never read again
        if len(todo) < n_parts:
            logging.info("latents: %d of %d parts already in %s", n_parts - len(todo), n_parts, workdir)
        t0, images = time.perf_counter(), 0
        for j, k in enumerate(todo):
            part = eval_splits.batches(d, mesh, train=True, start=k * c.part_batches, count=c.part_batches)
            tmp = os.path.join(local, os.path.basename(name(k)) + ".tmp")  # ArrayRecord writes local files only
            writer = ArrayRecordWriter(tmp, "group_size:1")
            for b in part:
                z, z_flip = encode(params, b["images"])
                rows = jax.sharding.PartitionSpec(sharding.BATCH_AXES)
                z, z_flip, labels, valid = (np.asarray(a) for a in multihost_utils.global_array_to_host_local_array(
                    (z, z_flip, b["labels"], b["valid"]), mesh, rows))  # this process's rows
                for i in np.flatnonzero(valid):
                    writer.write(latents_lib.encode_record(z[i].astype(dtype), z_flip[i].astype(dtype), labels[i]))
                images += int(np.sum(valid)) * n_proc
            writer.close()
            paths.upload(tmp, name(k))  # whole parts only: a killed run leaves no partial one
            rate = images / (time.perf_counter() - t0)
            logging.info("latents: part %d of %d written, %.1f images/s, ETA %.0f s", k + 1, n_parts, rate,
                         (len(todo) - j - 1) * c.part_batches * d.batch_size / rate)
        multihost_utils.sync_global_devices("latents written")
        if pid == 0:
            if given is None:
                latents_lib.write_stats(workdir, shape, dtype, c.stats_samples, seed=config.seed)
            else:  # e.g. the release's latents_stats.pt: the DiT normalizes as the released one did
                with paths.open_file(paths.join(workdir, latents_lib.STATS), "wb") as f:
                    np.savez(f, mean=given[0], std=given[1])
            tokenizer = c.tokenizer if hub.is_hub_id(c.tokenizer) else paths.resolve(c.tokenizer)
            meta = dict(shape=list(shape), dtype=dtype.name, tokenizer=tokenizer,
                        num_classes=num_classes(d), image_size=d.image_size, records=latents_lib.count_records(workdir),
                        stats=paths.resolve(c.stats) if c.stats else "")
            paths.write_json(paths.join(workdir, latents_lib.META), meta, indent=1)
        multihost_utils.sync_global_devices("latents stats written")
    return workdir


def num_classes(d) -> int:
    """The class count of a data config's labels, where the source says it (0: unknown)."""
    if d.source == "procedural":
        return len(procedural.CLASS_NAMES)
    if d.source == "tfds" and d.tfds_name.split(":")[0] == "imagenet2012":
        return 1000
    return 0  # unknown: the DiT job takes 1 + the largest label it finds
