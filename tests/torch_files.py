"""torch.save files written without torch, in torch's exact zip layout, for tests.

A torch.save (torch >= 1.6) file is an uncompressed zip whose members sit in one folder
<archive>/: data.pkl (a protocol-2 pickle of the object, each tensor rebuilt by
torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks)
and each storage a persistent id ('storage', torch.<Type>Storage, key, location, numel)),
byteorder ("little"), data/<key> (each storage's raw bytes) and version ("3"). `save` writes
exactly that; `Tensor` takes any offset / size / stride, so tests can also craft the files a
careless reader would trust. benchmarks/RESULTS.md ("torch.save files without torch") records
that torch.load reads these files to the same tensors (torch 2.13, outside the repo).
"""
from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import zipfile

import ml_dtypes
import numpy as np

STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
                 np.dtype(np.float16): "HalfStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
                 np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage",
                 np.dtype(np.int8): "CharStorage", np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage"}


class Global:
    """A name pickled by reference (GLOBAL 'module name'), without importing the module."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce wants a callable
        raise TypeError("a stand-in for pickling only")


REBUILD_TENSOR = Global("torch._utils", "_rebuild_tensor_v2")
REBUILD_PARAMETER = Global("torch._utils", "_rebuild_parameter")


@dataclasses.dataclass(eq=False)
class Tensor:
    """A view of `storage` (1-D; shared storages share their key): sizes, strides in elements."""
    storage: np.ndarray
    offset: int
    size: tuple
    stride: tuple
    parameter: bool = False  # torch.nn.Parameter

    def __reduce__(self):
        rebuilt = (REBUILD_TENSOR, (_StorageRef(self.storage), self.offset, tuple(self.size), tuple(self.stride),
                                    False, collections.OrderedDict()))
        if not self.parameter:
            return rebuilt
        return REBUILD_PARAMETER, (_Rebuilt(*rebuilt), False, collections.OrderedDict())


@dataclasses.dataclass(eq=False)
class _StorageRef:
    array: np.ndarray


@dataclasses.dataclass(eq=False)
class _Rebuilt:
    func: Global
    args: tuple

    def __reduce__(self):
        return self.func, self.args


def tensor(a, parameter: bool = False) -> Tensor:
    """A contiguous tensor holding a copy of `a` in its own storage."""
    a = np.array(a, order="C")  # 0-d stays 0-d
    strides = tuple(int(np.prod(a.shape[i + 1:])) for i in range(a.ndim))
    return Tensor(a.reshape(-1), 0, a.shape, strides, parameter)


class _Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table takes our Global
    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file, storages):
        super().__init__(file, protocol=2)
        self.storages = storages  # id(array) -> (key, array)

    def save_global_name(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[Global] = save_global_name

    def persistent_id(self, obj):
        if not isinstance(obj, _StorageRef):
            return None
        a = obj.array
        key = self.storages.setdefault(id(a), (str(len(self.storages)), a))[0]
        return "storage", Global("torch", STORAGE_NAMES[a.dtype]), key, "cpu", a.size


def save(obj, path, archive: str = "archive", byteorder: str = "little") -> None:
    """torch.save(obj, path) for an object of dicts / lists / tuples / plain values and `Tensor`s
    (byteorder 'big': as a big-endian machine writes it)."""
    storages = {}
    buf = io.BytesIO()
    _Pickler(buf, storages).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{archive}/data.pkl", buf.getvalue())
        z.writestr(f"{archive}/byteorder", byteorder)
        for key, a in storages.values():
            z.writestr(f"{archive}/data/{key}", a.astype(a.dtype.newbyteorder("<" if byteorder == "little" else ">")).tobytes())
        z.writestr(f"{archive}/version", "3\n")
