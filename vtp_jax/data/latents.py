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

import collections
import io
import json
import pickle
import zipfile
from typing import Any, Iterator, NamedTuple

import grain
import ml_dtypes
import msgpack
import numpy as np
from absl import logging

from vtp_jax import paths

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
    if _is_torch_zip(path):
        stats = read_torch_file(path)
        if not isinstance(stats, dict) or not {"mean", "std"} <= set(stats):
            raise ValueError(f"{path}: expected a dict with 'mean' and 'std' (LightningDiT's latents_stats.pt), "
                             f"got {type(stats).__name__} {sorted(stats) if isinstance(stats, dict) else ''}")
        mean, std = stats["mean"], stats["std"]
    else:
        with paths.open_file(path) as f, np.load(f) as s:
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
# torch.save files without torch: the zip layout (<archive>/data.pkl + <archive>/data/<key>).
# ------------------------------------------------------------------------------------------------
_TORCH_STORAGES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}


class _StorageType(NamedTuple):
    dtype: Any


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2: a strided view of the storage (strides in elements), copied."""
    del requires_grad, hooks, metadata
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], tuple(size), tuple(s * item for s in stride))
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    del requires_grad, hooks
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Resolves only the names a file of tensors uses; anything else is refused, so no code runs."""

    _ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                ("collections", "OrderedDict"): collections.OrderedDict}

    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[module, name]
        if module == "torch" and name in _TORCH_STORAGES:
            return _StorageType(np.dtype(_TORCH_STORAGES[name]))
        raise pickle.UnpicklingError(f"{module}.{name} is not a tensor, storage or container: refused")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, kind, key, _location, numel = pid
        return self._load_storage(str(key), kind.dtype, int(numel))


def _is_torch_zip(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())


def read_torch_file(path: str):
    """The object a `torch.save` (zip format, torch >= 1.6) file holds, its tensors as NumPy arrays,
    read without torch: only tensors, parameters, dicts, lists and plain values are accepted."""
    path = paths.local_copy(path)  # zipfile seeks: a local file
    if not _is_torch_zip(path):
        raise ValueError(f"{path}: not a torch.save zip file (legacy torch files: re-save with torch >= 1.6)")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = next(n for n in names if n.endswith("data.pkl"))
        prefix = pkl[: -len("data.pkl")]
        order = z.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
        storages = {}

        def load_storage(key, dtype, numel):
            if key not in storages:
                raw = z.read(f"{prefix}data/{key}")
                a = np.frombuffer(raw, dtype.newbyteorder("<" if order == "little" else ">"), count=numel)
                storages[key] = a.astype(dtype)  # native byte order, writable
            return storages[key]

        return _TorchUnpickler(io.BytesIO(z.read(pkl)), load_storage).load()


# ------------------------------------------------------------------------------------------------
# The official latent shards (safetensors).
# ------------------------------------------------------------------------------------------------
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "U8": np.uint8}


def _safetensors_header(path: str) -> dict:
    """{name: (dtype, shape, start byte in the file)} of a .safetensors file."""
    with paths.open_file(path) as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n < 100 << 20:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        out[name] = (np.dtype(_ST_DTYPES[info["dtype"]]), tuple(info["shape"]), 8 + n + info["data_offsets"][0])
    return out


def official_shard_paths(folder: str) -> list[str]:
    """The safetensors files of an official latent folder, sorted (as ImgLatentDataset reads them)."""
    return sorted(paths.glob(paths.join(folder, "*.safetensors")))


def is_official(folder: str) -> bool:
    """An official (LightningDiT / VTP) latent folder: safetensors shards and no meta.json of ours."""
    return (paths.isdir(folder) and not paths.isfile(paths.join(folder, META))
            and bool(official_shard_paths(folder)))


class OfficialLatentSource:
    """Random access to the records of official latent shards: {latent, latent_flip (H, W, C) float32
    NHWC (the files are NCHW), label int32}. Files are memory-mapped when first read, so the source
    pickles cheaply into grain's workers."""

    def __init__(self, folder: str):
        self.paths = official_shard_paths(folder)
        if not self.paths:
            raise FileNotFoundError(f"no official latent shards (*.safetensors) in {folder}")
        self._headers, counts = [], []
        for p in self.paths:
            h = _safetensors_header(p)
            missing = [k for k in OFFICIAL_KEYS if k not in h]
            if missing:
                raise ValueError(f"{p}: no {', '.join(missing)}; official latent shards hold {OFFICIAL_KEYS}")
            (dt, shape, _), (dt_f, shape_f, _), (_, shape_y, _) = (h[k] for k in OFFICIAL_KEYS)
            if len(shape) != 4 or shape_f != shape or shape_y != shape[:1] or dt_f != dt:
                raise ValueError(f"{p}: latents {shape} {dt}, latents_flip {shape_f} {dt_f}, labels {shape_y}: "
                                 "expected (N, C, H, W) twice, same dtype, and (N,)")
            if self._headers and shape[1:] != self._headers[0]["latents"][1][1:]:
                raise ValueError(f"{p}: latents of shape {shape[1:]}, {self.paths[0]} has "
                                 f"{self._headers[0]['latents'][1][1:]}")
            self._headers.append(h)
            counts.append(shape[0])
        c, hh, ww = self._headers[0]["latents"][1][1:]
        self.shape, self.dtype = (hh, ww, c), self._headers[0]["latents"][0]
        self._starts = np.cumsum([0] + counts)
        self._maps = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    def _read(self, f: int, key: str, j: int, count: int = 1) -> np.ndarray:
        if f not in self._maps:
            self._maps[f] = np.memmap(paths.local_copy(self.paths[f]), np.uint8, mode="r")  # gs://: a local copy
        dtype, shape, start = self._headers[f][key]
        per = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        raw = self._maps[f][start + j * per: start + (j + count) * per]
        return np.frombuffer(raw, dtype).reshape((count,) + shape[1:])

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
