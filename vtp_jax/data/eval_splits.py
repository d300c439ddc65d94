"""The splits evaluators read and the DiT's latents are extracted from: procedural scenes,
ArrayRecord shards or TFDS, as global batches sharded over the mesh's batch axes.

Each process reads its 1/P through `pipeline.make_eval_iterator`; the last batch is padded
(`valid`), and every process yields the same number of batches so the collectives line up.
"""
from __future__ import annotations

import math
import time
from typing import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from vtp_jax import sharding
from vtp_jax.data import pipeline, sources


class _Head:
    """The first n records of a random-access source."""

    def __init__(self, source, n: int):
        self.source, self.n = source, min(n, len(source)) if n else len(source)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]


def make_source(d: ml_collections.ConfigDict, train: bool = False):
    n = d.num_train_images if train else d.num_images
    if d.source == "procedural":
        return sources.ProceduralSource(d.procedural_seed + (0 if train else 1), d.procedural_size, n,
                                        max_objects=d.procedural_objects, sizes=d.procedural_sizes)
    if d.source == "array_record":
        paths = d.train_paths if train else d.paths
        if not paths:
            raise ValueError(f"data.{'train_paths' if train else 'paths'} is empty: give the split's ArrayRecord shards")
        return _Head(sources.array_record_source(paths), n)
    return _Head(sources.TFDSSource(d.tfds_name, d.train_split if train else d.split, d.tfds_data_dir or None), n)


def num_batches(d: ml_collections.ConfigDict, train: bool = False) -> int:
    """How many global batches `batches` yields for the whole split."""
    n_proc = jax.process_count()
    return math.ceil(math.ceil(len(make_source(d, train)) / n_proc) / (d.batch_size // n_proc))


def batches(d: ml_collections.ConfigDict, mesh, train: bool = False, name: str = "", start: int = 0,
            count: int | None = None) -> Iterator[dict]:
    """Global batches {images (ImageNet-normalized), labels, valid} of a split, sharded over the
    mesh's batch axes; every process yields the same number of them. `start` / `count`: a window of
    the pass (batches before `start` are never read). With a `name`, progress (rate, ETA) is
    logged every 30 s."""
    source = make_source(d, train)
    n_proc, pid = jax.process_count(), jax.process_index()
    local = d.batch_size // n_proc
    total = math.ceil(math.ceil(len(source) / n_proc) / local)
    count = total - start if count is None else min(count, total - start)
    seen, t0, last = 0, time.perf_counter(), time.perf_counter()
    for b in pipeline.make_eval_iterator(source, image_size=d.image_size, batch_size=local, crop=d.crop,
                                         process_index=pid, process_count=n_proc, start=start * local):
        if seen == count:
            break
        seen += 1
        yield sharding.global_batch(b, mesh)
        if name and time.perf_counter() - last > 30:
            last = time.perf_counter()
            rate = seen / (last - t0)
            logging.info("%s: batch %d of %d, %.2f batches/s, ETA %.0f s", name, seen, count, rate,
                         (count - seen) / rate)
    empty = {"images": np.zeros((local, d.image_size, d.image_size, 3), np.float32),
             "labels": np.full((local,), -1, np.int32), "valid": np.zeros((local,), bool)}
    for _ in range(count - seen):  # shorter shares (or skipped records) pad with empty batches
        yield sharding.global_batch(empty, mesh)
