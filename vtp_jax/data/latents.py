"""Cached tokenizer latents for the DiT: extraction, the record format, statistics, the pipeline.

    python -m vtp_jax.main --config=configs/extract_latents.py --config.latents.tokenizer=DIR --workdir=W

encodes the train split of a dataset (ImageNet via TFDS with ADM's centre crop at 256, ArrayRecord
shards or the procedural set) with a tokenizer, each image unflipped and flipped (LightningDiT
draws one of the two per sample), into W/part-<k>-of-<P>-<p>.array_record: part k covers global
batches [k * part_batches, (k + 1) * part_batches), each process writes its own rows, so the
batches are sharded over every device of every process. A part is written to a temporary name and
renamed when whole, so a killed extraction resumes at the first part some process lacks. At the
end W/stats.npz holds the per-channel mean and std of min(10k, N) random unflipped latents and
W/meta.json the shapes, the class count and the tokenizer.
"""
from __future__ import annotations

import glob
import json
import math
import os
from typing import Iterator

import grain
import ml_collections
import msgpack
import numpy as np
from absl import logging

META, STATS = "meta.json", "stats.npz"


def encode_record(latent: np.ndarray, latent_flip: np.ndarray, label: int) -> bytes:
    return msgpack.packb({"latent": latent.tobytes(), "latent_flip": latent_flip.tobytes(), "label": int(label)})


def decode_record(data: bytes, shape, dtype) -> dict:
    r = msgpack.unpackb(data)
    return {"latent": np.frombuffer(r["latent"], dtype).reshape(shape).astype(np.float32),
            "latent_flip": np.frombuffer(r["latent_flip"], dtype).reshape(shape).astype(np.float32),
            "label": np.int32(r["label"])}


def read_meta(folder: str) -> dict:
    path = os.path.join(folder, META)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {folder} is not a finished latent extraction "
                                "(python -m vtp_jax.main --config=configs/extract_latents.py ...)")
    with open(path) as f:
        return json.load(f)


def load_stats(folder: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), each (C,) float32."""
    with np.load(os.path.join(folder, STATS)) as s:
        return s["mean"].astype(np.float32), s["std"].astype(np.float32)


def shard_paths(folder: str) -> list[str]:
    paths = sorted(glob.glob(os.path.join(folder, "part-*.array_record")))
    if not paths:
        raise FileNotFoundError(f"no latent shards (part-*.array_record) in {folder}")
    return paths


# ------------------------------------------------------------------------------------------------
# Extraction.
# ------------------------------------------------------------------------------------------------
def extract(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Encodes config.latents.data's train split into `workdir` (see the module docstring);
    returns the folder. Every process runs it (collectives), each writing its own files."""
    import jax
    import jax.numpy as jnp
    from array_record.python.array_record_module import ArrayRecordWriter
    from jax.experimental import multihost_utils

    from vtp_jax.evals import evaluator
    from vtp_jax.models.vtp import VTP
    from vtp_jax.train import evaluate, runner, sharding

    from vtp_jax import config as config_lib

    try:
        config_lib.check_fields(config, config_lib.default_config(config.job))
    except ValueError as e:
        raise runner.ConfigError(str(e)) from None
    c = config.latents
    if not c.tokenizer:
        raise runner.ConfigError("latents.tokenizer is empty: give a release-format folder or a training workdir")
    d = c.data
    if d.source == "procedural" and not d.num_train_images:
        raise runner.ConfigError("latents.data.num_train_images=0: the procedural set is unbounded, give a number")
    mesh = sharding.make_mesh(config.train.mesh)
    n_proc, pid = jax.process_count(), jax.process_index()
    if d.batch_size % (sharding.batch_size_of(mesh) * n_proc):
        raise runner.ConfigError(f"latents.data.batch_size={d.batch_size} is not divisible by the "
                                 f"{sharding.batch_size_of(mesh)} batch shards and {n_proc} processes")
    os.makedirs(workdir, exist_ok=True)
    if os.path.isfile(os.path.join(workdir, META)):
        logging.info("latents in %s are complete", workdir)
        return workdir
    model_cfg, params = evaluate.load_tokenizer(c.tokenizer)
    model = VTP(model_cfg)
    dtype = np.dtype(c.dtype)

    @jax.jit
    def encode(params, images):
        z = model.apply({"params": params}, images, method=VTP.encode)
        z_flip = model.apply({"params": params}, images[:, :, ::-1], method=VTP.encode)
        return z, z_flip

    with runner.scope_of(mesh):
        params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        source = evaluator.make_source(d, train=True)
        n_batches = math.ceil(math.ceil(len(source) / n_proc) / (d.batch_size // n_proc))
        n_parts = math.ceil(n_batches / c.part_batches)
        name = lambda k: os.path.join(workdir, f"part-{k:05d}-of-{n_proc:03d}-{pid:03d}.array_record")  # noqa: E731
        done = [os.path.isfile(name(k)) for k in range(n_parts)]
        done = multihost_utils.process_allgather(np.array(done)).reshape(-1, n_parts).all(axis=0) if n_proc > 1 \
            else np.array(done)
        batches = evaluator.batches(d, mesh, train=True)
        h = d.image_size // model_cfg.patch_size
        shape = (h, h, model_cfg.latent_dim)
        for k in range(n_parts):
            part = [next(batches, None) for _ in range(min(c.part_batches, n_batches - k * c.part_batches))]
            if done[k]:
                continue  # the pipeline still reads its batches: the order of the rest is unchanged
            tmp = name(k) + ".tmp"
            writer = ArrayRecordWriter(tmp, "group_size:1")
            for b in part:
                z, z_flip = encode(params, b["images"])
                rows = jax.sharding.PartitionSpec(sharding.BATCH_AXES)
                z, z_flip, labels, valid = (np.asarray(a) for a in multihost_utils.global_array_to_host_local_array(
                    (z, z_flip, b["labels"], b["valid"]), mesh, rows))  # this process's rows
                for i in np.flatnonzero(valid):
                    writer.write(encode_record(z[i].astype(dtype), z_flip[i].astype(dtype), labels[i]))
            writer.close()
            os.replace(tmp, name(k))
            logging.info("latents: part %d of %d written", k + 1, n_parts)
        multihost_utils.sync_global_devices("latents written")
        if pid == 0:
            write_stats(workdir, shape, dtype, c.stats_samples, seed=config.seed)
            meta = dict(shape=list(shape), dtype=dtype.name, tokenizer=os.path.abspath(c.tokenizer),
                        num_classes=_num_classes(d), image_size=d.image_size, records=count_records(workdir))
            with open(os.path.join(workdir, META), "w") as f:
                json.dump(meta, f, indent=1)
        multihost_utils.sync_global_devices("latents stats written")
    return workdir


def _num_classes(d) -> int:
    from vtp_jax.data import procedural

    if d.source == "procedural":
        return len(procedural.CLASS_NAMES)
    if d.source == "tfds" and d.tfds_name.split(":")[0] == "imagenet2012":
        return 1000
    return 0  # unknown: the DiT job takes 1 + the largest label it finds


def count_records(folder: str) -> int:
    source = grain.sources.ArrayRecordDataSource(shard_paths(folder))
    return len(source)


def write_stats(folder: str, shape, dtype, n_samples: int, seed: int = 0):
    """Per-channel mean and unbiased std of min(n_samples, N) random unflipped latents."""
    source = grain.sources.ArrayRecordDataSource(shard_paths(folder))
    n = len(source)
    idx = np.random.default_rng(seed).choice(n, min(n_samples, n), replace=False)
    z = np.stack([decode_record(source[int(i)], shape, dtype)["latent"] for i in np.sort(idx)]).astype(np.float64)
    z = z.reshape(-1, shape[-1])  # every position of every sampled latent, per channel
    mean, std = z.mean(axis=0), z.std(axis=0, ddof=1)
    np.savez(os.path.join(folder, STATS), mean=mean.astype(np.float32), std=std.astype(np.float32))


# ------------------------------------------------------------------------------------------------
# The training pipeline.
# ------------------------------------------------------------------------------------------------
class _Decode:
    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def __call__(self, data: bytes) -> dict:
        return decode_record(data, self.shape, self.dtype)


def make_train_iterator(folder: str, *, batch_size: int, seed: int, process_index: int, process_count: int,
                        num_workers: int = 0) -> Iterator[dict]:
    """Per-process batches {latent, latent_flip (B/P, h, w, C) f32, label (B/P,) int32}: a seeded
    shuffle of all records each epoch, each process its 1/P; a grain iterator (checkpointable)."""
    meta = read_meta(folder)
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {process_count} processes")
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(shard_paths(folder)))
    ds = ds.shuffle(seed=seed).repeat(None)[process_index::process_count].map(_Decode(meta["shape"], meta["dtype"]))
    ds = ds.batch(batch_size // process_count, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=64))
    if num_workers:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it)
