"""The fuzz campaign over every reader of files users hand vtp-jax (docs/files.md).

For each reader, valid files of its format are mutated at random (seeded: the same inputs every
run): bytes flipped, set or cut, members of a zip rewritten and re-zipped (so that a CRC does not
hide the change from the parser), headers rewritten with random sizes, strides, offsets, dtypes and
field types. All inputs of a reader go through it in one child process (`python this_file --child
READER DIR`), under an address-space limit set after a warm-up read. Every outcome must be the
reader's documented exception or a result equal to what an independent reference reader returns
for the same file; never a signal, an undocumented exception (MemoryError included), more than
a few seconds, or a resident-memory growth beyond the file's size times a small factor.
benchmarks/RESULTS.md ("Files from elsewhere: the fuzz campaign") records what it found.
"""
from __future__ import annotations

import io
import itertools
import json
import math
import os
import pickle
import random
import resource
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SECONDS = 5.0  # the most one input may take
GROWTH = 16  # resident memory may grow by at most GROWTH x the input's size + SLACK
SLACK = 48 << 20


# ------------------------------------------------------------------------------------------------
# Mutations.
# ------------------------------------------------------------------------------------------------
def mutate_bytes(b: bytes, rng: random.Random) -> bytes:
    b = bytearray(b)
    kind = rng.randrange(6)
    if kind == 0 or not b:
        for _ in range(rng.randint(1, 8)):
            if b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del b[rng.randrange(len(b)):]
    elif kind == 2:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x30, 0x39))
    elif kind == 3:
        i = rng.randrange(len(b))
        b[i:i] = b[rng.randrange(len(b)):][: rng.randint(1, 64)]
    elif kind == 4:
        i = rng.randrange(len(b))
        del b[i: i + rng.randint(1, 64)]
    else:
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(b)


def rezip(blob: bytes, rng: random.Random) -> bytes:
    """The zip with one member mutated (or renamed, or dropped), written anew with valid CRCs."""
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        members = [(i.filename, z.read(i), i.compress_type) for i in z.infolist()]
    k = rng.randrange(len(members))
    name, data, compression = members[k]
    what = rng.randrange(10)
    if what == 0:
        members.pop(k)
    elif what == 1:
        members[k] = (name.replace("/", rng.choice(("//", "/../", "x/")), 1), data, compression)
    else:
        members[k] = (name, mutate_bytes(data, rng), compression)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data, compression in members:
            z.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return out.getvalue()


INTERESTING = (0, 1, 2, 3, 4, 5, 7, 64, 1000, 10 ** 8, 2 ** 31, 2 ** 62, 2 ** 64, -1, -(2 ** 63), 1.5, "3", None, True)


def some(rng):
    return rng.choice(INTERESTING)


# ------------------------------------------------------------------------------------------------
# Valid files and their mutants, one generator per reader: (suffix, list of byte strings).
# ------------------------------------------------------------------------------------------------
def torch_inputs(rng, n):
    import ml_dtypes

    import torch_files

    def save(obj):
        path = io.BytesIO()
        torch_files.save(obj, path, archive="x")
        return path.getvalue()

    base = np.arange(24, dtype=np.float32)
    valid = [save({"mean": torch_files.tensor(np.linspace(-1, 1, 6, dtype=np.float32).reshape(1, 6, 1, 1)),
                   "std": torch_files.tensor(np.ones((1, 6, 1, 1), np.float32))}),
             save({"t": torch_files.Tensor(base, 2, (3, 4), (1, 6)), "h": torch_files.tensor(base[:6].astype(np.float16)),
                   "b": torch_files.tensor(base[:5].astype(ml_dtypes.bfloat16)), "i": torch_files.tensor(np.arange(7)),
                   "nested": [torch_files.tensor(np.zeros(3, np.float32)), {"k": (1, "s", 2.5)}]})]
    out = list(valid)
    storages = [np.arange(k).astype(d) for k in (0, 1, 4, 24) for d in (np.float32, np.int64, np.float16, np.uint8)]
    while len(out) < n:
        kind = rng.randrange(4)
        if kind == 0:  # a tensor whose offset / size / stride / storage are drawn at random
            nd = rng.randrange(5)
            size = tuple(some(rng) if rng.random() < 0.3 else rng.randrange(6) for _ in range(nd))
            stride = tuple(some(rng) if rng.random() < 0.3 else rng.randrange(8) for _ in range(nd + (rng.random() < 0.1)))
            offset = some(rng) if rng.random() < 0.3 else rng.randrange(6)
            out.append(save({"mean": torch_files.Tensor(rng.choice(storages), offset, size, stride)}))
        elif kind == 1:
            out.append(rezip(rng.choice(valid), rng))
        elif kind == 2:
            out.append(mutate_bytes(rng.choice(valid), rng))
        else:
            out.append(rezip(rezip(rng.choice(valid), rng), rng))
    return ".pt", out


def safetensors_inputs(rng, n):
    import ml_dtypes
    import safetensors.numpy

    valid = [safetensors.numpy.save({"latents": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
                                     "flip": np.arange(24).astype(ml_dtypes.bfloat16).reshape(2, 3, 2, 2),
                                     "labels": np.arange(2)}, metadata={"total_size": "2"}),
             safetensors.numpy.save({"w": np.ones((3, 5), np.float16), "e": np.zeros((0, 4), np.float32)})]
    dtypes = ["F32", "F16", "BF16", "I64", "I32", "U8", "BOOL", "F64", "I8", "U16", "F8_E4M3", "F8_E5M2", "C64", "F4",
              "Q8", "", 5, ["F32"], None]
    out = list(valid)
    while len(out) < n:
        blob = rng.choice(valid)
        if rng.random() < 0.5:  # the header rewritten
            h = int.from_bytes(blob[:8], "little")
            header = json.loads(blob[8:8 + h])
            name = rng.choice([k for k in header if k != "__metadata__"])
            field = rng.choice(("dtype", "shape", "data_offsets", "data_offsets", "shape", "metadata"))
            if field == "dtype":
                header[name]["dtype"] = rng.choice(dtypes)
            elif field == "shape":
                header[name]["shape"] = [some(rng) if rng.random() < 0.3 else rng.randrange(6)
                                         for _ in range(rng.randrange(5))]
            elif field == "data_offsets":
                header[name]["data_offsets"] = [some(rng) if rng.random() < 0.3 else rng.randrange(200)
                                                for _ in range(rng.choice((2, 2, 2, 1, 3)))]
            else:
                header["__metadata__"] = {"k": some(rng)}
            text = json.dumps(header).encode()
            length = len(text) if rng.random() < 0.8 else some(rng)
            length = length if isinstance(length, int) and 0 <= length < 2 ** 64 else len(text)
            out.append(length.to_bytes(8, "little") + text + blob[8 + h:])
        else:
            out.append(mutate_bytes(blob, rng))
    return ".safetensors", out


def npz_inputs(rng, n):
    def savez(compressed, **arrays):
        f = io.BytesIO()
        (np.savez_compressed if compressed else np.savez)(f, **arrays)
        return f.getvalue()

    arrays = dict(mu=np.linspace(0, 1, 8), sigma=np.eye(8, dtype=np.float32), f=np.asfortranarray(np.ones((3, 4))),
                  i=np.arange(5, dtype=np.int16))
    valid = [savez(False, **arrays), savez(True, **arrays)]
    out = list(valid)
    while len(out) < n:
        blob = rng.choice(valid)
        kind = rng.randrange(3)
        if kind == 0:  # a member's .npy header rewritten
            with zipfile.ZipFile(io.BytesIO(blob)) as z:
                members = {i.filename: (z.read(i), i.compress_type) for i in z.infolist()}
            name = rng.choice(sorted(members))
            data, compression = members[name]
            header = {"descr": rng.choice(("<f8", "<f4", "|u1", ">i8", "|O", "V0", "<U3", "|b1", "(1000000,)<f8")),
                      "fortran_order": rng.random() < 0.3,
                      "shape": tuple(some(rng) if rng.random() < 0.3 else rng.randrange(9) for _ in range(rng.randrange(4)))}
            f = io.BytesIO()
            try:
                np.lib.format.write_array_header_1_0(f, header)
            except Exception:  # noqa: BLE001  a header numpy itself cannot write: write it by hand
                text = repr(header).encode()
                f = io.BytesIO(b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text)
            members[name] = (f.getvalue() + data[128:], compression)
            o = io.BytesIO()
            with zipfile.ZipFile(o, "w") as z:
                for k, (d, c) in members.items():
                    z.writestr(zipfile.ZipInfo(k), d, compress_type=c)
            out.append(o.getvalue())
        elif kind == 1:
            out.append(rezip(blob, rng))
        else:
            out.append(mutate_bytes(blob, rng))
    return ".npz", out


def image_inputs(rng, n):
    import struct
    import zlib

    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (12, 16, 3), np.uint8)
    valid = []
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP"):
        f = io.BytesIO()
        Image.fromarray(pixels).save(f, fmt)
        valid.append(f.getvalue())
    out = list(valid)
    while len(out) < n:
        if rng.random() < 0.3:  # the PNG header claims another size (CRC fixed): bombs and liars
            b = bytearray(valid[0])
            w, h = rng.choice(((rng.randrange(1, 3000), rng.randrange(1, 3000)), (60000, 60000), (2 ** 31 - 1, 2),
                               (16, 12), (0, 5)))
            b[16:24] = struct.pack(">II", w, h)
            b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
            out.append(bytes(b))
        else:
            out.append(mutate_bytes(rng.choice(valid), rng))
    return ".img", out


def tar_inputs(rng, n):
    import gzip

    from PIL import Image

    f = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(f, "PNG")
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        for key in ("a", "b", "c"):
            for ext, data in ((".png", f.getvalue()), (".txt", f"a red square {key}".encode()), (".cls", b"3")):
                info = tarfile.TarInfo(f"shard/{key}{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    valid = [tar.getvalue(), gzip.compress(tar.getvalue())]
    out = list(valid)
    while len(out) < n:
        b = bytearray(valid[0])
        if rng.random() < 0.4:  # a member header's size / type / name rewritten, checksum fixed
            start = 512 * rng.choice([i for i in range(len(b) // 512) if b[512 * i + 257: 512 * i + 262] == b"ustar"])
            field = rng.choice(("size", "type", "name"))
            if field == "size":  # octal, or GNU base-256 for sizes past 8 GB
                size = rng.choice((0, 5, 511, 513, 10 ** 6, 8 ** 11 - 1, 2 ** 80))
                b[start + 124: start + 136] = (b"\x80" + size.to_bytes(11, "big") if size >= 8 ** 11 else
                                               (oct(size)[2:].zfill(11) + "\0").encode())
            elif field == "type":
                b[start + 156] = ord(rng.choice("0123456LKSgxV\0"))
            else:
                b[start: start + 100] = rng.choice((b"../../../../tmp/evil.png", b"/etc/passwd", b"", b"a" * 99)).ljust(100, b"\0")
            b[start + 148: start + 156] = b" " * 8
            b[start + 148: start + 156] = (oct(sum(b[start: start + 512]))[2:].zfill(6) + "\0 ").encode()
            out.append(bytes(b))
        else:
            out.append(mutate_bytes(rng.choice(valid), rng))
    return ".tar", out


def array_record_inputs(rng, n, folder):
    from array_record.python import array_record_module

    from vtp_jax.data import sources

    valid = []
    for options in ("group_size:1,uncompressed", "group_size:4"):
        path = os.path.join(folder, "tmp.array_record")
        w = array_record_module.ArrayRecordWriter(path, options)
        for i in range(12):
            w.write(sources.encode_record(bytes([i]) * 300, f"caption {i}", i))
        w.close()
        valid.append(open(path, "rb").read())
        os.remove(path)
    out = list(valid)
    while len(out) < n:
        blob = rng.choice(valid)
        end = max(i for i in range(len(blob)) if blob[i]) + 1  # past the records: zero padding
        b = mutate_bytes(blob[:end], rng) + blob[end:] if rng.random() < 0.8 else mutate_bytes(blob, rng)
        out.append(b)
    return ".array_record", out


def _json_mutants(valid: dict, rng, n):
    out = [json.dumps(valid).encode()]
    leaves = []

    def walk(d, path):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, path + (k,))
            else:
                leaves.append(path + (k,))

    walk(valid, ())
    while len(out) < n:
        if rng.random() < 0.8:
            d = json.loads(json.dumps(valid))
            for _ in range(rng.randint(1, 3)):
                path = rng.choice(leaves + [("model",), ("objectives",)])
                node = d
                for k in path[:-1]:
                    node = node.setdefault(k, {}) if isinstance(node.get(k, {}), dict) else {}
                node[path[-1]] = rng.choice((some(rng), [1, 2], {"x": 1}, "rmsnorm", -3, 1e308, 0.0, 4.0))
            text = json.dumps(d).encode()
            out.append(text if rng.random() < 0.9 else b"[" * 100_000)
        else:
            out.append(mutate_bytes(out[0], rng))
    return ".json", out


def release_config_inputs(rng, n):
    from vtp_jax import config as config_lib
    from vtp_jax.checkpoints import released

    return _json_mutants(released.config_to_release(config_lib.model_config()), rng, n)


def workdir_config_inputs(rng, n):
    from vtp_jax import config as config_lib

    schema = {"job": "pretrain", "model": config_lib.model_config().to_dict(),
              "objectives": config_lib.objectives_config().to_dict()}
    return _json_mutants(json.loads(json.dumps(schema, default=list)), rng, n)


# ------------------------------------------------------------------------------------------------
# The readers (child side): read(path) -> result, check(path, result) -> problem or None, the
# documented exception types.
# ------------------------------------------------------------------------------------------------
def _same(a, b) -> bool:
    """Equal structure, dtypes, shapes and bytes (NaN included)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and a.tobytes() == b.tobytes())
    if isinstance(a, dict):  # an OrderedDict's order matters, a dict's (safetensors lists by offset) not
        keys = (lambda d: list(d)) if type(a) is not dict else (lambda d: sorted(map(str, d)))  # noqa: E731
        return type(a) is type(b) and keys(a) == keys(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def reference_torch(path):
    """Another reader of torch.save zips: eager, element by element, every index bounds-checked."""
    import collections

    import ml_dtypes

    names = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
             "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
             "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
    with zipfile.ZipFile(path) as z:
        pkl = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith("/data.pkl"))
        prefix = pkl[:-8]
        order = z.read(prefix + "byteorder").decode() if prefix + "byteorder" in z.namelist() else "little"

        def rebuild(storage, offset, size, stride, *_):
            raw, dtype, numel = storage
            dtype = np.dtype(dtype).newbyteorder("<" if order == "little" else ">")
            out = np.zeros(size, np.dtype(dtype).newbyteorder("="))
            if not out.size:
                return out
            for idx in itertools.product(*map(range, size)):
                e = offset + sum(i * s for i, s in zip(idx, stride))
                assert 0 <= e < numel
                out[idx] = np.frombuffer(raw, dtype, count=1, offset=e * dtype.itemsize)[0]
            return out

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                allowed = {("torch._utils", "_rebuild_tensor_v2"): rebuild,
                           ("torch._utils", "_rebuild_parameter"): lambda data, *_: data,
                           ("collections", "OrderedDict"): collections.OrderedDict}
                if module == "torch" and name in names:
                    return names[name]
                return allowed[module, name]

            def persistent_load(self, pid):
                raw = z.read(f"{prefix}data/{pid[2]}")
                assert len(raw) == pid[4] * np.dtype(pid[1]).itemsize
                return raw, pid[1], pid[4]

        return Unpickler(io.BytesIO(z.read(pkl))).load()




def reference_safetensors(path):
    """The careful hand-written reader vtp-jax had before (checkpoints/released.py), kept as the
    reference: every header entry checked against the data it describes."""
    import ml_dtypes

    dtypes = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "BOOL": np.bool_,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "C64": np.complex64}
    blob = open(path, "rb").read()
    n = int.from_bytes(blob[:8], "little")
    header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = np.dtype(dtypes[info["dtype"]])
        assert all(type(x) is int and x >= 0 for x in info["shape"] + [start, end]) and start <= end <= len(data)
        assert end - start == math.prod(info["shape"]) * dtype.itemsize
        out[name] = np.frombuffer(data[start:end], dtype).reshape(info["shape"])
    return out


def _reader(name):
    """(read, reference-check, documented exception types) of reader `name`, in the child."""
    if name == "torch":
        from vtp_jax.data import files

        def check(path, got):
            try:
                want = reference_torch(path)
            except Exception as e:  # noqa: BLE001
                return f"ours read it, the reference refused it ({type(e).__name__}: {e})"
            return None if _same(got, want) else "differs from the reference"

        return files.read_torch_file, check, (ValueError,)
    if name == "safetensors":
        from vtp_jax.data import files

        def check(path, got):
            try:
                want = reference_safetensors(path)
            except Exception as e:  # noqa: BLE001
                return f"ours read it, the reference refused it ({type(e).__name__}: {e})"
            return None if _same(got, want) else "differs from the reference"

        return files.read_safetensors, check, (ValueError,)
    if name == "npz":
        from vtp_jax.data import files

        def read(path):
            with files.NpzArchive(path) as a:
                return {k: a[k] for k in a.files}

        def check(path, got):
            with np.load(path, allow_pickle=False) as want:
                if sorted(got) != sorted(k for k in want.files if k + ".npy" in want.zip.namelist()):
                    return f"arrays {sorted(got)}, np.load lists {want.files}"
                return None if _same(got, {k: want[k] for k in got}) else "differs from np.load"

        return read, check, (ValueError,)
    if name == "image":
        from PIL import Image

        from vtp_jax import images

        def read(path):
            return np.asarray(images.decode_image(open(path, "rb").read())[0])

        def check(path, got):
            try:
                ref = Image.open(path)
                ref.load()
            except Exception as e:  # noqa: BLE001
                return f"ours decoded it, PIL refused it ({type(e).__name__}: {e})"
            if ref.mode not in ("RGB", "L", "P") or "transparency" in ref.info:
                return None  # alpha is composited on white, not PIL's convert: nothing to compare
            return None if _same(got, np.asarray(ref.convert("RGB"))) else "differs from PIL's own decode"

        return read, check, (images.DecodeError,)
    if name == "tar":
        from collections import Counter

        from vtp_jax.data import prepare, sources

        def read(path):
            counts = Counter()
            return [sources.decode_record(r) for r in prepare._webdataset_records([path], counts)], counts

        def check(path, got):
            records, counts = got
            if any(k.startswith(("skipped/unreadable", "skipped/truncated", "skipped/too_large")) for k in counts):
                return None  # a partial read: what it yields is checked by decode_record above
            try:
                with tarfile.open(path, "r:*") as t:
                    members = {m.name: t.extractfile(m).read() for m in t if m.isfile()}
            except Exception:  # noqa: BLE001  tarfile's random-access mode may refuse what the stream read
                return None
            want = {f"{os.path.basename(path)}/{k.rsplit('.', 1)[0]}": v for k, v in members.items()
                    if k.lower().endswith((".png", ".jpg", ".jpeg", ".webp")) and not os.path.basename(k).startswith(".")}
            got_images = {r["key"]: r["image"] for r in records}
            return None if all(want.get(k) == v for k, v in got_images.items()) else "an image differs from its member"

        return read, check, ()
    if name == "array_record":
        from vtp_jax.data import sources

        def read(path):
            src = sources.array_record_source(path)
            return [src[i] for i in range(len(src))]

        def check(path, got):
            want = [sources.encode_record(bytes([i]) * 300, f"caption {i}", i) for i in range(12)]
            bad = [i for i, r in enumerate(got) if r and (i >= len(want) or r != want[i])]
            return f"records {bad} differ from those written (not skipped)" if bad else None

        return read, check, (ValueError,)
    if name == "release_config":
        from vtp_jax.checkpoints import released

        def check(path, got):
            rc = json.load(open(path))
            for field, ours in (("vision_embed_dim", got.width), ("vision_depth", got.depth),
                                ("vision_patch_size", got.patch_size)):
                if field in rc and rc[field] != ours:
                    return f"{field}={rc[field]!r} became {ours!r}"
            return None

        return released.read_release_config, check, (released.CheckpointError,)
    if name == "workdir_config":
        import ml_collections

        from vtp_jax import config as config_lib

        def read(path):
            schema = ml_collections.ConfigDict(dict(model=config_lib.model_config(),
                                                    objectives=config_lib.objectives_config()))
            return config_lib.read_saved(path, schema, ("model", "objectives"))

        def check(path, got):
            saved = json.load(open(path))
            for section in ("model", "objectives"):
                for k, v in saved.get(section, {}).items():
                    if k in got[section] and not isinstance(v, dict) and got[section][k] != (
                            tuple(v) if isinstance(v, list) else v):
                        return f"{section}.{k}={v!r} became {got[section][k]!r}"
            return None

        return read, check, (config_lib.ConfigError,)
    raise KeyError(name)


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def child(name: str, folder: str) -> None:
    """Runs every input of `folder` through reader `name`; one JSON line per input on stdout."""
    read, check, documented = _reader(name)
    inputs = sorted(f for f in os.listdir(folder) if not f.endswith(".progress"))
    try:  # warm-up: the first (valid) input, so that the libraries' own buffers and threads exist
        read(os.path.join(folder, inputs[0]))
    except Exception:  # noqa: BLE001
        pass
    biggest = max(os.path.getsize(os.path.join(folder, f)) for f in inputs)
    limit = _vm_bytes() + GROWTH * biggest + (1 << 30)  # a hard stop for runaway allocations
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    progress = open(os.path.join(folder, ".progress"), "w")
    for f in inputs:
        path = os.path.join(folder, f)
        progress.write(f + "\n")
        progress.flush()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t = time.perf_counter()
        problem = None
        try:
            outcome = "ok"
            problem = check(path, read(path))
        except documented as e:
            outcome = type(e).__name__
        except BaseException as e:  # noqa: BLE001  everything else is what the campaign looks for
            outcome, problem = type(e).__name__, f"undocumented {type(e).__name__}: {str(e)[:300]}"
        seconds = time.perf_counter() - t
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss
        print(json.dumps(dict(input=f, size=os.path.getsize(path), outcome=outcome, problem=problem,
                              seconds=round(seconds, 4), growth=growth)), flush=True)


# ------------------------------------------------------------------------------------------------
# The campaign (parent side).
# ------------------------------------------------------------------------------------------------
READERS = {  # reader: (inputs, how many)
    "torch": (torch_inputs, 1200), "safetensors": (safetensors_inputs, 1200), "npz": (npz_inputs, 1000),
    "image": (image_inputs, 600), "tar": (tar_inputs, 600), "array_record": (array_record_inputs, 150),
    "release_config": (release_config_inputs, 300), "workdir_config": (workdir_config_inputs, 300),
}


@pytest.mark.parametrize("name", list(READERS))
def test_fuzz_reader(name, tmp_path):
    make, n = READERS[name]
    rng = random.Random(f"fuzz-{name}")
    suffix, blobs = make(rng, n, str(tmp_path)) if name == "array_record" else make(rng, n)
    folder = tmp_path / name
    folder.mkdir()
    for i, b in enumerate(blobs):
        (folder / f"{i:05d}{suffix}").write_bytes(b)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]))
    t = time.perf_counter()
    try:
        run = subprocess.run([sys.executable, __file__, "--child", name, str(folder)], capture_output=True, text=True,
                             env=env, timeout=60)
    except subprocess.TimeoutExpired:
        stuck = (folder / ".progress").read_text().split()[-1]
        pytest.fail(f"{name}: hangs on {stuck} (kept at {folder})")
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode:
        stuck = (folder / ".progress").read_text().split()[-1]
        pytest.fail(f"{name}: the child died (exit {run.returncode}) on {stuck}: {run.stderr[-2000:]}")
    assert len(rows) == len(blobs), run.stderr[-2000:]
    problems = [r for r in rows if r["problem"]]
    slow = [r for r in rows if r["seconds"] > SECONDS]
    greedy = [r for r in rows if r["growth"] > GROWTH * r["size"] + SLACK]
    outcomes = {}
    for r in rows:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    print(f"\nfuzz {name}: {len(rows)} inputs in {time.perf_counter() - t:.1f} s, outcomes {outcomes}, slowest "
          f"{max(r['seconds'] for r in rows):.3f} s, most growth {max(r['growth'] for r in rows) >> 20} MB")
    assert not problems, problems[:5]
    assert not slow, slow[:5]
    assert not greedy, greedy[:5]
    assert outcomes.get("ok", 0) >= 2  # the valid files read: the readers are exercised, not only refused


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    if sys.argv[2] not in ("release_config",):  # skip vtp_jax/__init__ (jax): these readers do not need it
        import types

        package = types.ModuleType("vtp_jax")
        package.__path__ = [os.path.join(ROOT, "vtp_jax")]
        sys.modules["vtp_jax"] = package
    child(sys.argv[2], sys.argv[3])
