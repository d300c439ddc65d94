"""Cached tokenizer latents for the DiT: the record format, statistics, the pipeline.

The `extract_latents` job (`vtp_jax.jobs.extract_latents`) encodes the train split of a dataset
(ImageNet via TFDS with ADM's centre crop at 256, ArrayRecord shards or the procedural set) with a tokenizer, each image unflipped and flipped (LightningDiT
draws one of the two per sample), into W/part-<k>-of-<P>-<p>.array_record: part k covers global
batches [k * part_batches, (k + 1) * part_batches), each process writes its own rows, so the
batches are sharded over every device of every process. A part is written to a temporary name and
renamed when whole, so a killed extraction resumes at the first part some process lacks. At the
end W/stats.npz holds the per-channel mean and std of min(10k, N) random unflipped latents (or
those of `latents.stats`, e.g. the release's latents_stats.pt) and W/meta.json the shapes, the
class count and the tokenizer.

The DiT also trains on the OFFICIAL layout (LightningDiT's `extract_features.py`, VTP's
`extract_features_vtp.py`, read there by `ImgLatentDataset`): a folder of
`latents_rank<RR>_shard<SSS>.safetensors` files, each with `latents` and `latents_flip` (N, C, H, W)
(float32, or float16 / bfloat16) and `labels` (N,) int64, plus `latents_stats.pt`. Both layouts
are read through `latent_source` / `read_meta` / `latent_stats`; records come out NHWC float32.
"""
from __future__ import annotations

import json
from typing import Iterator

import grain
import msgpack
import numpy as np
from absl import logging

from vtp_jax import paths
from vtp_jax.data import files

META, STATS = "meta.json", "stats.npz"
RELEASE_STATS = "latents_stats.pt"  # LightningDiT's ImgLatentDataset cache; VTP ships S / B / L ones
OFFICIAL_KEYS = ("latents", "latents_flip", "labels")


def encode_record(latent: np.ndarray, latent_flip: np.ndarray, label: int) -> bytes:
    return msgpack.packb({"latent": latent.tobytes(), "latent_flip": latent_flip.tobytes(), "label": int(label)})


def decode_record(data: bytes, shape, dtype) -> dict:
    r = msgpack.unpackb(data)
    return {"latent": np.frombuffer(r["latent"], dtype).reshape(shape).astype(np.float32),
            "latent_flip": np.frombuffer(r["latent_flip"], dtype).reshape(shape).astype(np.float32),
            "label": np.int32(r["label"])}


def read_meta(folder: str) -> dict:
    """meta.json of our extraction, or its equivalent for an official folder (`official_meta`)."""
    if is_official(folder):
        return official_meta(folder)
    path = paths.join(folder, META)
    if not paths.isfile(path):
        raise FileNotFoundError(f"{path} not found: {folder} is not a finished latent extraction "
                                "(python -m vtp_jax.main --config=configs/extract_latents.py ...)")
    with paths.open_file(path, "r") as f:
        return json.load(f)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), each (C,) float32, from our stats.npz, the release's latents_stats.pt (a dict of
    1 x C x 1 x 1 float32 tensors, read without torch) or a folder holding either (stats.npz first).
    """
    if paths.isdir(path):
        for name in (STATS, RELEASE_STATS):
            if paths.isfile(paths.join(path, name)):
                return load_stats(paths.join(path, name))
        raise FileNotFoundError(f"no latent statistics ({STATS} or {RELEASE_STATS}) in {path}")
    if not paths.isfile(path):
        raise FileNotFoundError(f"latent statistics {path!r} do not exist")
    if files.is_torch_zip(path):
        stats = files.read_torch_file(path)
        if not isinstance(stats, dict) or not {"mean", "std"} <= set(stats):
            raise ValueError(f"{path}: expected a dict with 'mean' and 'std' (LightningDiT's latents_stats.pt), "
                             f"got {type(stats).__name__} {sorted(stats) if isinstance(stats, dict) else ''}")
        mean, std = stats["mean"], stats["std"]
    else:
        with files.NpzArchive(path) as s:
            missing = [k for k in ("mean", "std") if k not in s]
            if missing:
                raise ValueError(f"{path}: no {' or '.join(missing)}; latent statistics hold 'mean' and 'std'")
            mean, std = s["mean"], s["std"]
    mean, std = (_per_channel(np.asarray(a), path, k) for a, k in ((mean, "mean"), (std, "std")))
    if mean.shape != std.shape:
        raise ValueError(f"{path}: mean has {mean.size} channels and std {std.size}")
    if not (np.all(np.isfinite(mean)) and np.all(std > 0)):
        raise ValueError(f"{path}: the statistics are not finite or some std is <= 0")
    return mean, std


def normalize(z, mean, std, multiplier: float = 1.0):
    """What the DiT sees: LightningDiT's per-channel (z - mean) / std * multiplier, channels last."""
    return (z - mean) / std * multiplier


def denormalize(x, mean, std, multiplier: float = 1.0):
    """The inverse of `normalize`: DiT samples back to tokenizer latents."""
    return x / multiplier * std + mean


def _per_channel(a: np.ndarray, path: str, name: str) -> np.ndarray:
    """(C,) from (C,), (1, C) or the release's (1, C, 1, 1): every axis but one has size 1."""
    if a.ndim == 0 or sum(d != 1 for d in a.shape) > 1:
        raise ValueError(f"{path}: {name} has shape {a.shape}, expected per-channel values such as (C,) or "
                         "(1, C, 1, 1)")
    return a.reshape(-1).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# The official latent shards (safetensors, read through `files`).
# ------------------------------------------------------------------------------------------------
def official_shard_paths(folder: str) -> list[str]:
    """The safetensors files of an official latent folder, sorted (as ImgLatentDataset reads them)."""
    return sorted(paths.glob(paths.join(folder, "*.safetensors")))


def is_official(folder: str) -> bool:
    """An official (LightningDiT / VTP) latent folder: safetensors shards and no meta.json of ours."""
    return (paths.isdir(folder) and not paths.isfile(paths.join(folder, META))
            and bool(official_shard_paths(folder)))


class OfficialLatentSource:
    """Random access to the records of official latent shards: {latent, latent_flip (H, W, C) float32
    NHWC (the files are NCHW), label int32}. Files are opened by the `safetensors` library (which
    checks each header against the file's bytes) and read a row at a time; a pickled copy (grain's
    workers) opens them again."""

    def __init__(self, folder: str):
        self.paths = official_shard_paths(folder)
        if not self.paths:
            raise FileNotFoundError(f"no official latent shards (*.safetensors) in {folder}")
        self._headers, counts, self._files = [], [], {}
        for f, p in enumerate(self.paths):
            h = self._open(f)
            missing = [k for k in OFFICIAL_KEYS if k not in h.keys()]
            if missing:
                raise ValueError(f"{p}: no {', '.join(missing)}; official latent shards hold {OFFICIAL_KEYS}")
            try:
                (shape, dt), (shape_f, dt_f), (shape_y, dt_y) = (_shape_dtype(h, k) for k in OFFICIAL_KEYS)
            except (TypeError, ValueError, AttributeError) as e:  # a dtype NumPy has no type for
                raise ValueError(f"{p}: cannot read the tensors' dtypes ({e})") from None
            if (len(shape) != 4 or shape_f != shape or shape_y != shape[:1] or dt_f != dt
                    or not np.issubdtype(dt_y, np.integer)):
                raise ValueError(f"{p}: latents {shape} {dt}, latents_flip {shape_f} {dt_f}, labels {shape_y} {dt_y}: "
                                 "expected (N, C, H, W) twice, same dtype, and (N,) integers")
            if self._headers and shape[1:] != self._headers[0][1][1:]:
                raise ValueError(f"{p}: latents of shape {shape[1:]}, {self.paths[0]} has {self._headers[0][1][1:]}")
            self._headers.append((np.dtype(dt), shape))
            counts.append(shape[0])
        c, hh, ww = self._headers[0][1][1:]
        self.shape, self.dtype = (hh, ww, c), self._headers[0][0]
        self._starts = np.cumsum([0] + counts)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}

    def _open(self, f: int):
        if f not in self._files:
            self._files[f] = files.open_safetensors(self.paths[f])
        return self._files[f]

    def _read(self, f: int, key: str, j: int, count: int = 1) -> np.ndarray:
        return self._open(f).get_slice(key)[j: j + count]

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of {len(self)}")
        f = int(np.searchsorted(self._starts, i, side="right")) - 1
        j = i - int(self._starts[f])
        nhwc = lambda k: self._read(f, k, j)[0].transpose(1, 2, 0).astype(np.float32)  # noqa: E731
        return {"latent": nhwc("latents"), "latent_flip": nhwc("latents_flip"),
                "label": np.int32(self._read(f, "labels", j)[0])}

    def labels(self) -> np.ndarray:
        counts = np.diff(self._starts)
        return np.concatenate([self._read(f, "labels", 0, int(n)) for f, n in enumerate(counts)]).astype(np.int64)


def _shape_dtype(handle, key: str):
    """(shape, NumPy dtype) of a tensor of an open safetensors file, without reading it."""
    sl = handle.get_slice(key)
    shape = tuple(sl.get_shape())
    return shape, (sl[0:0].dtype if shape else handle.get_tensor(key).dtype)


def official_meta(folder: str) -> dict:
    """What meta.json would say of an official folder: shapes from the files, the class count as
    1 + the largest label (the files do not record it), no tokenizer (set dit.tokenizer)."""
    src = OfficialLatentSource(folder)
    return dict(shape=list(src.shape), dtype=src.dtype.name, tokenizer="", num_classes=int(src.labels().max()) + 1,
                records=len(src), format="official")


class _DecodedRecords:
    """Our ArrayRecord shards as decoded records (the same interface as OfficialLatentSource)."""

    def __init__(self, folder: str, meta: dict):
        self.source = grain.sources.ArrayRecordDataSource(shard_paths(folder))
        self.decode = _Decode(meta["shape"], meta["dtype"])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        return self.decode(self.source[int(i)])


def latent_source(folder: str):
    """Random access to the decoded records {latent, latent_flip (h, w, C) float32, label} of
    either layout."""
    if is_official(folder):
        return OfficialLatentSource(folder)
    return _DecodedRecords(folder, read_meta(folder))


def latent_stats(folder: str, stats: str = "", n_samples: int = 10_000, seed: int = 0):
    """The (mean, std) a DiT trains and samples with: `stats` (a file or folder `load_stats` reads)
    if given, else the latents folder's own; an official folder without a stats file gets them
    computed as ImgLatentDataset does (min(n_samples, N) random unflipped latents), not written."""
    if stats:
        return load_stats(stats)
    if is_official(folder) and not any(paths.isfile(paths.join(folder, n)) for n in (STATS, RELEASE_STATS)):
        src = OfficialLatentSource(folder)
        logging.info("latents: %s has no %s; computing the statistics of %d random latents", folder, RELEASE_STATS,
                     min(n_samples, len(src)))
        return _stats_of(lambda i: src[i]["latent"], len(src), n_samples, seed)
    return load_stats(folder)


def shard_paths(folder: str) -> list[str]:
    found = paths.glob(paths.join(folder, "part-*.array_record"))
    if not found:
        raise FileNotFoundError(f"no latent shards (part-*.array_record) in {folder}")
    return found


def count_records(folder: str) -> int:
    source = grain.sources.ArrayRecordDataSource(shard_paths(folder))
    return len(source)


def write_stats(folder: str, shape, dtype, n_samples: int, seed: int = 0):
    """Per-channel mean and unbiased std of min(n_samples, N) random unflipped latents."""
    source = grain.sources.ArrayRecordDataSource(shard_paths(folder))
    mean, std = _stats_of(lambda i: decode_record(source[i], shape, dtype)["latent"], len(source), n_samples, seed)
    with paths.open_file(paths.join(folder, STATS), "wb") as f:
        np.savez(f, mean=mean, std=std)


def _stats_of(latent, n: int, n_samples: int, seed: int):
    """Per-channel mean and unbiased std over every position of min(n_samples, n) random records."""
    idx = np.random.default_rng(seed).choice(n, min(n_samples, n), replace=False)
    z = np.stack([latent(int(i)) for i in np.sort(idx)]).astype(np.float64)
    z = z.reshape(-1, z.shape[-1])  # every position of every sampled latent, per channel
    return z.mean(axis=0).astype(np.float32), z.std(axis=0, ddof=1).astype(np.float32)


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
    """Per-process batches {latent, latent_flip (B/P, h, w, C) f32, label (B/P,) int32} from our
    extraction or an official folder: a seeded shuffle of all records each epoch, each process its
    1/P; a grain iterator (checkpointable)."""
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {process_count} processes")
    if is_official(folder):  # decoded records, NCHW -> NHWC
        ds = grain.MapDataset.source(OfficialLatentSource(folder)).shuffle(seed=seed).repeat(None)
        ds = ds[process_index::process_count]
    else:
        meta = read_meta(folder)
        ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(shard_paths(folder)))
        ds = ds.shuffle(seed=seed).repeat(None)[process_index::process_count].map(_Decode(meta["shape"], meta["dtype"]))
    ds = ds.batch(batch_size // process_count, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=64))
    if num_workers:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it)
