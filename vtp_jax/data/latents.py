"""Cached tokenizer latents for the DiT: the record format, statistics, the pipeline.

The `extract_latents` job (`vtp_jax.jobs.extract_latents`) encodes the train split of a dataset (ImageNet via TFDS with ADM's centre crop at 256, ArrayRecord
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
import os
from typing import Iterator

import grain
import msgpack
import numpy as np

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
