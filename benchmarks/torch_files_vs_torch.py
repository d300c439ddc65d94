"""torch.save files without torch, checked against torch itself (the one place torch is needed).

The tests write torch.save files with tests/torch_files.py and read them with
vtp_jax.data.files.read_torch_file; neither imports torch. This script proves both faithful once,
with a real torch in a separate environment (torch is no dependency of vtp_jax, nor of CI):

  python -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy ml_dtypes
  python benchmarks/torch_files_vs_torch.py --torch_python /tmp/torchvenv/bin/python

(a) files written by tests/torch_files.py are read by torch.load(weights_only=True) to the same
    tensors (dtype, shape, values, and views of one storage sharing it);
(b) files written by torch.save are read by read_torch_file to the same arrays;
(c) crafted files (a view past its storage, a size over the storage, a storage shorter than it
    declares) are refused by torch.load and by read_torch_file alike.
Cases: float32 / float16 / bfloat16 / int64 / float64 / int32 / uint8 / bool, transposed and
sliced views with offsets, 0-d and empty tensors, Parameters, OrderedDicts, nested lists / tuples /
dicts with plain values. The torch side runs in --torch_python (this file, --torch_side DIR).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = ("float32", "float16", "bfloat16", "int64", "float64", "int32", "uint8", "bool")


def cases(np_dtype, arange):
    """{name: (storage 1-D array, offset, size, stride)} of views of every kind, for one backend."""
    out = {}
    for d in DTYPES:
        base = arange(24, d)
        out[f"{d}/contiguous"] = (base, 0, (4, 6), (6, 1))
        out[f"{d}/transposed"] = (base, 0, (6, 4), (1, 6))
        out[f"{d}/sliced"] = (base, 7, (2, 3), (6, 2))
        out[f"{d}/scalar"] = (base, 5, (), ())
        out[f"{d}/empty"] = (base, 0, (0, 3), (3, 1))
        out[f"{d}/stats"] = (base, 2, (1, 6, 1, 1), (6, 1, 1, 1))
    return out


def torch_side(folder: str) -> None:
    """In the torch environment: torch.load our files, compare; torch.save the references; try the
    crafted files."""
    import collections

    import torch

    dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
          "float64": torch.float64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}

    def want_of(name):  # the expected values, as float64 NumPy (exact for these small integers)
        d = name.split("/")[0]
        base = torch.arange(24, dtype=torch.float64).to(dt[d])
        storage, offset, size, stride = cases(None, lambda n, d: base)[name]
        return torch.as_strided(storage, size, stride, offset)

    # (a) our files, read by torch
    ours = torch.load(os.path.join(folder, "ours.pt"), weights_only=True)
    bad = []
    for name in cases(None, lambda n, d: None):
        got, want = ours["views"][name], want_of(name)
        if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape) or not torch.equal(got, want):
            bad.append(name)
    shared = ours["views"]["float32/transposed"].untyped_storage().data_ptr() == \
        ours["views"]["float32/contiguous"].untyped_storage().data_ptr()
    extras = (isinstance(ours["param"], torch.nn.Parameter) and torch.equal(ours["param"].data, torch.ones(2, 2))
              and isinstance(ours["od"], collections.OrderedDict) and float(ours["od"]["a"]) == 3.0
              and ours["nested"][1] == {"k": (1, "s", 2.5)} and torch.equal(ours["nested"][0], torch.zeros(3)))
    print(f"(a) torch.load of tests/torch_files.py files: {len(ours['views']) - len(bad)} of {len(ours['views'])} "
          f"views equal (dtype, shape, values){'; differ: ' + ', '.join(bad) if bad else ''}; views of one storage "
          f"share it in torch: {shared}; Parameter, OrderedDict, nested containers: {extras}")
    # (b) torch's files, for read_torch_file
    views = {}
    for name in cases(None, lambda n, d: None):
        d = name.split("/")[0]
        base = torch.arange(24, dtype=torch.float64).to(dt[d])
        storage, offset, size, stride = cases(None, lambda n, d: base)[name]
        views[name] = torch.as_strided(storage, size, stride, offset)
    torch.save({"views": views, "param": torch.nn.Parameter(torch.ones(2, 2)),
                "od": collections.OrderedDict(a=torch.tensor(3.0)),
                "nested": [torch.zeros(3), {"k": (1, "s", 2.5)}]}, os.path.join(folder, "torch.pt"))
    # (c) crafted files
    for name in sorted(os.listdir(folder)):
        if name.startswith("crafted_"):
            try:
                torch.load(os.path.join(folder, name), weights_only=True)
                print(f"(c) torch.load {name}: READ (not refused)")
            except Exception as e:  # noqa: BLE001
                print(f"(c) torch.load {name}: refused ({type(e).__name__}: {str(e).splitlines()[0][:110]})")
    print(f"torch {torch.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch_python", help="a Python with torch installed")
    ap.add_argument("--torch_side", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_side:
        return torch_side(args.torch_side)
    import collections

    import ml_dtypes

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    import torch_files
    from vtp_jax.data import files

    np_dt = lambda d: np.dtype(ml_dtypes.bfloat16) if d == "bfloat16" else np.dtype(d)  # noqa: E731
    bases = {d: np.arange(24).astype(np_dt(d)) for d in DTYPES}
    views = {name: torch_files.Tensor(*spec) for name, spec in cases(None, lambda n, d: bases[d]).items()}
    with tempfile.TemporaryDirectory() as folder:
        torch_files.save({"views": views, "param": torch_files.tensor(np.ones((2, 2), np.float32), parameter=True),
                          "od": collections.OrderedDict(a=torch_files.tensor(np.float32(3.0))),
                          "nested": [torch_files.tensor(np.zeros(3, np.float32)), {"k": (1, "s", 2.5)}]},
                         os.path.join(folder, "ours.pt"))
        f32 = np.arange(4, dtype=np.float32)
        crafted = {"past_storage": torch_files.Tensor(f32, 0, (64,), (1,)),
                   "offset_past_storage": torch_files.Tensor(f32, 3, (2,), (1,)),
                   "stride_past_storage": torch_files.Tensor(f32, 0, (2, 2), (1, 1000))}
        for name, t in crafted.items():
            torch_files.save({"mean": t}, os.path.join(folder, f"crafted_{name}.pt"))
        torch_files.save({"mean": torch_files.tensor(f32)}, os.path.join(folder, "crafted_short_storage.pt"))
        _cut_storage(os.path.join(folder, "crafted_short_storage.pt"))
        out = subprocess.run([args.torch_python, os.path.abspath(__file__), "--torch_side", folder],
                             capture_output=True, text=True)
        print(out.stdout, end="")
        if out.returncode:
            sys.exit(out.stderr)
        got = files.read_torch_file(os.path.join(folder, "torch.pt"))
        bad = []
        for name, t in views.items():
            want = np.lib.stride_tricks.as_strided(t.storage[t.offset:], t.size,
                                                   [s * t.storage.itemsize for s in t.stride]) if t.size else \
                t.storage[t.offset]
            g = got["views"][name]
            if g.dtype != want.dtype or g.shape != np.shape(want) or not np.array_equal(g, want):
                bad.append(name)
        extras = (np.array_equal(got["param"], np.ones((2, 2), np.float32)) and isinstance(got["od"], collections.OrderedDict)
                  and float(got["od"]["a"]) == 3.0 and got["nested"][1] == {"k": (1, "s", 2.5)})
        print(f"(b) read_torch_file of torch.save files: {len(views) - len(bad)} of {len(views)} views equal "
              f"(dtype, shape, values){'; differ: ' + ', '.join(bad) if bad else ''}; Parameter, OrderedDict, "
              f"nested containers: {extras}")
        for name in sorted(os.listdir(folder)):
            if name.startswith("crafted_"):
                try:
                    files.read_torch_file(os.path.join(folder, name))
                    print(f"(c) read_torch_file {name}: READ (not refused)")
                except ValueError as e:
                    print(f"(c) read_torch_file {name}: refused ({str(e).split(': ', 1)[1][:110]})")


def _cut_storage(path: str) -> None:
    """Rewrites the file with its one storage 4 bytes shorter than its pickle declares."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, b in members.items():
            z.writestr(n, b[:-4] if n.endswith("data/0") else b)


if __name__ == "__main__":
    main()
