"""Tensor files from elsewhere: the one checked reader of each format users hand vtp-jax.

torch.save zip files (the release's latents_stats.pt), safetensors (release folders, official
latent shards, LightningDiT state dicts, our own exports) and .npz archives (ADM reference
batches, state dicts, latent statistics). A file is untrusted: what it declares (sizes, strides,
offsets, dtypes, byte counts) is checked against the bytes it holds before any array is built,
so a crafted file is one ValueError naming the file and the tensor, never memory from outside
the file, a crash, or an allocation larger than the file. No pickle code runs: the torch reader
resolves only tensors, parameters and OrderedDicts. docs/files.md lists every check;
tests/test_fuzz_readers.py mutates valid files at random to hold the readers to it.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import pickle
import zipfile
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
import safetensors

from vtp_jax import paths

MAX_DIMS = 32  # more than any tensor a checkpoint holds; numpy's own limit is 64


# ------------------------------------------------------------------------------------------------
# torch.save zip files (torch >= 1.6): <archive>/data.pkl, <archive>/byteorder, <archive>/data/<key>.
# ------------------------------------------------------------------------------------------------
TORCH_STORAGES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType(NamedTuple):
    dtype: np.dtype


class _Storage(NamedTuple):
    """A persistent id ('storage', type, key, location, numel), not yet read."""
    key: str
    dtype: np.dtype
    numel: int


class _Tensor(NamedTuple):
    """torch._utils._rebuild_tensor_v2's arguments, checked (and the tensor built) once the
    unpickled object names it."""
    storage: Any
    offset: Any
    size: Any
    stride: Any


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    del requires_grad, backward_hooks, metadata
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    del requires_grad, backward_hooks
    return data


class _Unpickler(pickle._Unpickler):
    """Resolves only what a file of tensors uses; any other name is refused before it is called.
    Python's own unpickler, not the C one: the C one sizes its memo from the indices the pickle
    names (LONG_BINPUT 10^9: gigabytes allocated by a 200-byte file; the fuzz campaign found it)."""

    _ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
                ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                ("collections", "OrderedDict"): collections.OrderedDict}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[module, name]
        if module == "torch" and name in TORCH_STORAGES:
            return _StorageType(np.dtype(TORCH_STORAGES[name]))
        raise ValueError(f"{module}.{name} is not a tensor, storage or container: refused (no pickle code runs)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and type(pid[4]) is int and pid[4] >= 0):
            raise ValueError(f"unsupported persistent id {str(pid)[:200]}")
        return _Storage(pid[2], pid[1].dtype, pid[4])


def _torch_pickle_name(names) -> str | None:
    """The zip member holding the pickle: data.pkl at the top or in the archive's one folder."""
    return next((n for n in names if n == "data.pkl" or n.count("/") == 1 and n.endswith("/data.pkl")), None)


def is_torch_zip(path: str) -> bool:
    """A torch.save zip file (an .npz is a zip too, without data.pkl)."""
    try:
        with paths.open_file(path) as f, zipfile.ZipFile(f) as z:
            return _torch_pickle_name(z.namelist()) is not None
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001  zipfile raises many types on garbage: not a torch zip
        return False


def read_torch_file(path: str):
    """The object a torch.save zip file holds, its tensors as NumPy arrays in their dtype, read
    without torch. Only tensors, parameters, dicts, lists, tuples and plain values are accepted;
    every tensor's storage, offset, sizes and strides are checked against the bytes the file
    holds (as torch's setStorage does). Anything else: one ValueError naming the file (and the
    tensor, by its place in the object: "['mean']")."""
    try:
        with paths.open_file(path) as f, zipfile.ZipFile(f) as z:
            return _read_torch_zip(z, _archive_size(f))
    except MemoryError:
        raise
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    except Exception as e:  # zipfile and pickle raise many types on garbage; each means "not readable"
        raise ValueError(f"{path}: not a readable torch.save zip file ({type(e).__name__}: {e})") from None


def _archive_size(f) -> int:
    f.seek(0, io.SEEK_END)
    return f.tell()


def _member(z: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A zip member's bytes; one declaring more than the archive holds is refused (a zip bomb)."""
    info = z.getinfo(name)
    if info.file_size > limit:
        raise ValueError(f"{name} declares {info.file_size} bytes in an archive of {limit}")
    return z.read(info)


def _read_torch_zip(z: zipfile.ZipFile, size: int):
    pkl = _torch_pickle_name(z.namelist())
    if pkl is None:
        raise ValueError("not a torch.save zip file: no data.pkl (legacy torch files: re-save with torch >= 1.6)")
    prefix = pkl[: -len("data.pkl")]
    order = "little"
    if prefix + "byteorder" in z.namelist():
        order = _member(z, prefix + "byteorder", size).decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise ValueError(f"byteorder {order[:20]!r}: expected 'little' or 'big'")
    storages = {}

    def load(st: _Storage) -> np.ndarray:
        if (st.key, st.dtype) not in storages:
            try:
                info = z.getinfo(f"{prefix}data/{st.key}")
            except KeyError:
                raise ValueError(f"storage {st.key!r} is not in the file") from None
            want = st.numel * st.dtype.itemsize
            if info.file_size != want:
                raise ValueError(f"storage {st.key!r} holds {info.file_size} bytes, its {st.numel} "
                                 f"{st.dtype.name} elements take {want}")
            raw = _member(z, info.filename, size)
            storages[st.key, st.dtype] = np.frombuffer(raw, st.dtype.newbyteorder("<" if order == "little" else ">"))
        return storages[st.key, st.dtype]

    obj = _Unpickler(io.BytesIO(_member(z, pkl, size))).load()
    return _materialize(obj, load, "", 0, {})


def _materialize(obj, load, where: str, depth: int, memo: dict):
    """The unpickled object with every tensor built (checked); each shared container built once."""
    if isinstance(obj, _Tensor):
        return _tensor(obj, load, where or "the tensor")
    if isinstance(obj, (_Storage, _StorageType)):
        raise ValueError(f"{where or 'the file'}: a bare storage, not a tensor")
    if not isinstance(obj, (dict, list, tuple, set, frozenset)):
        return obj
    if id(obj) in memo:
        return memo[id(obj)]
    if depth >= 64:
        raise ValueError(f"{where}: containers nested more than 64 deep")
    walk = lambda v, w: _materialize(v, load, w, depth + 1, memo)  # noqa: E731
    if isinstance(obj, dict):
        out = memo[id(obj)] = type(obj)()
        for k, v in obj.items():
            if isinstance(k, (_Tensor, _Storage, _StorageType)):
                raise ValueError(f"{where}: a tensor as a dict key")
            out[k] = walk(v, f"{where}[{k!r}]")
    elif isinstance(obj, list):
        out = memo[id(obj)] = []
        out.extend(walk(v, f"{where}[{i}]") for i, v in enumerate(obj))
    elif isinstance(obj, tuple):
        out = memo[id(obj)] = tuple(walk(v, f"{where}[{i}]") for i, v in enumerate(obj))
    else:
        if any(isinstance(v, (_Tensor, _Storage, _StorageType)) for v in obj):
            raise ValueError(f"{where}: a tensor in a set")
        out = obj
    return out


def _tensor(t: _Tensor, load, where: str) -> np.ndarray:
    """A copy of the strided view t describes, after checking that every element it reads lies
    inside its storage (torch refuses the same files: "setStorage: ... out of bounds")."""
    st, offset, size, stride = t
    if not isinstance(st, _Storage):
        raise ValueError(f"tensor {where}: its storage is a {type(st).__name__}")
    counts = lambda v: isinstance(v, tuple) and all(type(x) is int and x >= 0 for x in v)  # noqa: E731
    if not (type(offset) is int and offset >= 0 and counts(size) and counts(stride) and len(size) == len(stride)
            and len(size) <= MAX_DIMS):
        raise ValueError(f"tensor {where}: offset {str(offset)[:40]}, size {str(size)[:80]}, stride "
                         f"{str(stride)[:80]}: expected non-negative integers, one stride per size, at most "
                         f"{MAX_DIMS} dimensions")
    numel = math.prod(size)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if numel else offset
    if numel > st.numel:
        raise ValueError(f"tensor {where}: shape {size} has {numel} elements, its storage {st.numel} (a view that "
                         "repeats elements, such as expand(), is not read: save t.contiguous())")
    if (numel and last >= st.numel) or offset > st.numel:
        raise ValueError(f"tensor {where}: shape {size}, stride {stride}, offset {offset} reads element {last} of a "
                         f"storage of {st.numel}")
    data = load(st)
    if not numel:
        return np.zeros(size, st.dtype)
    contiguous = all(s == math.prod(size[i + 1:]) for i, (n, s) in enumerate(zip(size, stride)) if n > 1)
    if contiguous:
        out = data[offset: offset + numel].reshape(size)
    else:  # every index is < st.numel (checked above); NumPy's indexing checks it once more
        index = np.asarray(offset, np.int64)
        for n, s in zip(size, stride):
            index = index[..., None] + np.arange(n, dtype=np.int64) * (s if n > 1 else 0)
        out = data[index]
    return out.astype(st.dtype)  # a copy, native byte order


# ------------------------------------------------------------------------------------------------
# safetensors: the `safetensors` library (it checks the header against the file's bytes).
# ------------------------------------------------------------------------------------------------
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def open_safetensors(path: str):
    """The `safetensors` library's handle (`keys()`, `get_tensor`, `get_slice`) of a .safetensors
    file (a local copy of a remote one): the library refuses a header that disagrees with the
    file's bytes, reported as one ValueError naming the file (and the tensor, where one is to blame)."""
    local = paths.local_copy(path)
    try:
        return safetensors.safe_open(local, framework="numpy")
    except safetensors.SafetensorError as e:
        blame = _header_disagreement(local)
        raise ValueError(f"{path}: not a safetensors file, or a damaged one ({e}{'; ' + blame if blame else ''})") from None


def _header_disagreement(local: str) -> str:
    """Which tensor's header entry disagrees with the bytes, or that the file is cut short, where
    the library's error does not say."""
    try:
        with open(local, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(n, 100 << 20)))
            size = f.seek(0, io.SEEK_END) - 8 - n
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        for name, info in entries.items():
            if not isinstance(info["dtype"], str):
                return f"tensor {name!r} has dtype {str(info['dtype'])[:40]}: expected a string such as 'F32'"
            start, end = info["data_offsets"]
            want = math.prod(info["shape"]) * _ST_ITEMSIZE.get(info["dtype"], 0)
            if info["dtype"] in _ST_ITEMSIZE and end - start != want:
                return (f"tensor {name!r} has {end - start} bytes for shape {info['shape']} {info['dtype']}: "
                        f"expected {want}")
        end = max(info["data_offsets"][1] for info in entries.values())
        if end > size:
            return f"the header describes {end} bytes of data, the file holds {size}: truncated?"
    except Exception:  # noqa: BLE001  a hint only: the library's error stands on its own
        pass
    return ""


def read_safetensors(path: str, float_dtype=None) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file, in its dtype (bfloat16 as ml_dtypes'), floating-point
    ones cast to `float_dtype` if given. Errors: one ValueError naming the file and the tensor."""
    with open_safetensors(path) as f:
        out = {}
        for name in f.keys():
            try:
                a = f.get_tensor(name)
            except (safetensors.SafetensorError, TypeError, ValueError, AttributeError) as e:  # a dtype NumPy lacks
                raise ValueError(f"{path}: tensor {name!r} cannot be read ({e})") from None
            floating = np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16
            out[name] = a.astype(float_dtype) if float_dtype is not None and floating else a
    return out


# ------------------------------------------------------------------------------------------------
# .npz archives: each member's .npy header checked against the member's bytes.
# ------------------------------------------------------------------------------------------------
NPZ_MAX_INFLATION = 64  # np.savez_compressed members inflate by far less; a zip bomb by far more


class NpzArchive:
    """The arrays of an .npz file (`files`, `archive[key]`), as np.load with allow_pickle=False
    reads them, except that each member is checked first: its .npy header must declare exactly the
    bytes the member holds (a header claiming 10^12 elements is refused before any allocation),
    object arrays (pickles) are refused, a compressed member may inflate at most
    NPZ_MAX_INFLATION times. Errors: one ValueError naming the file and the array."""

    def __init__(self, path: str):
        self.path = path
        self._stack = contextlib.ExitStack()
        try:
            self._zip = self._stack.enter_context(zipfile.ZipFile(self._stack.enter_context(paths.open_file(path))))
        except Exception as e:  # noqa: BLE001  zipfile raises many types on garbage
            self._stack.close()
            if isinstance(e, (FileNotFoundError, MemoryError)):
                raise
            with paths.open_file(path) as f:
                npy = f.read(6) == b"\x93NUMPY"
            raise ValueError(f"{path}: " + ("a single .npy array, expected an .npz archive" if npy else
                                            f"not an .npz archive ({type(e).__name__}: {e})")) from None
        self.files = [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._stack.close()

    def __contains__(self, key):
        return key in self.files

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.files:
            raise KeyError(f"{self.path}: no array {key!r} (it has {self.files})")
        try:
            return self._read(self._zip.getinfo(key + ".npy"))
        except MemoryError:
            raise
        except ValueError as e:
            raise ValueError(f"{self.path}: array {key!r}: {e}") from None
        except Exception as e:  # noqa: BLE001  zipfile / zlib / the .npy header parser on garbage
            raise ValueError(f"{self.path}: array {key!r} cannot be read ({type(e).__name__}: {e})") from None

    def _read(self, info: zipfile.ZipInfo) -> np.ndarray:
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > NPZ_MAX_INFLATION * max(info.compress_size, 1):
            raise ValueError(f"{info.file_size} bytes compressed into {info.compress_size}: refused (a zip bomb?)")
        with self._zip.open(info) as m:
            version = np.lib.format.read_magic(m)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f".npy format version {version}: expected 1.0 or 2.0")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(m)
            if dtype.hasobject:
                raise ValueError("an object array (a pickle): refused")
            if len(shape) > MAX_DIMS or any(type(n) is not int or n < 0 for n in shape) or dtype.itemsize == 0:
                raise ValueError(f"shape {shape} of {dtype}: expected at most {MAX_DIMS} non-negative sizes and a "
                                 "dtype of non-zero size")
            want = math.prod(shape) * dtype.itemsize
            if info.file_size - m.tell() != want:
                raise ValueError(f"the header declares {shape} {dtype} ({want} bytes), the member holds "
                                 f"{info.file_size - m.tell()}")
            buf = bytearray(want)
            view, got = memoryview(buf), 0
            while got < want:
                k = m.readinto(view[got:])
                if not k:
                    raise ValueError(f"the member ends after {got} of {want} bytes")
                got += k
        a = np.frombuffer(buf, dtype)
        return a.reshape(shape[::-1]).T if fortran else a.reshape(shape)
