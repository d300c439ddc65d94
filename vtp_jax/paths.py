"""One path layer for every file the project reads or writes: local disks, gs:// and the other
filesystems `etils.epath` knows (orbax checkpoints through the same library).

With EPATH_USE_TF=false (the default here) remote paths go through fsspec / gcsfs, which honours
STORAGE_EMULATOR_HOST, so the whole project runs against a local GCS emulator in tests. Libraries
that only open local files get a local copy (`local_copy`) or write to a local file that is then
uploaded (`upload`); each call site says which library and why.
"""
from __future__ import annotations

import contextlib
import glob as glob_lib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

os.environ.setdefault("EPATH_USE_TF", "false")  # fsspec, not TensorFlow's gfile (which no emulator can serve)

from etils import epath  # noqa: E402

Path = epath.Path


def is_remote(path) -> bool:
    return "://" in os.fspath(path)


def resolve(path) -> str:
    """An absolute local path or the URL unchanged (os.path.abspath would turn gs://b/x into
    <cwd>/gs:/b/x)."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(*parts) -> str:
    return os.fspath(Path(os.fspath(parts[0])).joinpath(*map(os.fspath, parts[1:])))


def exists(path) -> bool:
    return bool(path) and Path(os.fspath(path)).exists()


def isfile(path) -> bool:
    return bool(path) and Path(os.fspath(path)).is_file()


def isdir(path) -> bool:
    return bool(path) and Path(os.fspath(path)).is_dir()


def makedirs(path) -> None:
    Path(os.fspath(path)).mkdir(parents=True, exist_ok=True)


def listdir(path) -> list[str]:
    return sorted(p.name for p in Path(os.fspath(path)).iterdir())


def remove(path) -> None:
    Path(os.fspath(path)).unlink()


def rename(src, dst) -> None:
    """Replaces dst (atomic on a local disk; a copy and a delete on object stores)."""
    Path(os.fspath(src)).replace(os.fspath(dst))


def glob(pattern: str) -> list[str]:
    """Sorted matches of a pattern (`*`, `?`, `[...]` in any component but no `**` on object
    stores, whose listing is one request per level)."""
    if not is_remote(pattern):
        return sorted(glob_lib.glob(pattern))
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    fixed = next((i for i, p in enumerate(parts) if glob_lib.has_magic(p)), len(parts))
    if fixed == len(parts):
        return [pattern] if exists(pattern) else []
    base = Path(f"{scheme}://{'/'.join(parts[:fixed])}")
    return sorted(os.fspath(p) for p in base.glob("/".join(parts[fixed:])))


def read_bytes(path) -> bytes:
    return Path(os.fspath(path)).read_bytes()


def read_text(path) -> str:
    return Path(os.fspath(path)).read_text()


def write_bytes(path, data: bytes) -> None:
    """Writes the whole file at once (object stores have no append), creating its folder."""
    p = Path(os.fspath(path))
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_json(path) -> Any:
    return json.loads(read_text(path))


def write_json(path, obj, **kw) -> None:
    write_text(path, json.dumps(obj, **kw))


@contextlib.contextmanager
def open_file(path, mode: str = "rb") -> Iterator[Any]:
    """A file object for libraries that take one (PIL, np.load / np.savez)."""
    if "w" in mode:
        Path(os.fspath(path)).parent.mkdir(parents=True, exist_ok=True)
    with Path(os.fspath(path)).open(mode) as f:
        yield f


def local_copy(path, cache: str | None = None) -> str:
    """A local file with the content of `path`: `path` itself when local, else a copy in `cache`
    (a temporary folder by default), for libraries that only open local files."""
    path = os.fspath(path)
    if not is_remote(path):
        return path
    cache = cache or _cache()
    local = os.path.join(cache, path.split("://", 1)[1].replace("/", "_"))
    if not os.path.exists(local):
        with Path(path).open("rb") as src, open(local + ".tmp", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(local + ".tmp", local)
    return local


_CACHE: list[str] = []


def _cache() -> str:
    """One temporary folder per process for the copies of remote files."""
    if not _CACHE:
        _CACHE.append(tempfile.mkdtemp(prefix="vtp_jax_cache_"))
    return _CACHE[0]


def upload(local: str, path) -> None:
    """Moves a finished local file to `path` (a rename when `path` is local too)."""
    path = os.fspath(path)
    if not is_remote(path):
        makedirs(os.path.dirname(path))
        os.replace(local, path)
        return
    with open(local, "rb") as src, Path(path).open("wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(local)


def sync_folder(local: str, path) -> None:
    """Copies every file of a local folder to `path` (same relative names), overwriting: the
    TensorBoard events written locally by TensorFlow's writer, whose own gs:// client cannot be
    pointed at an emulator and needs TensorFlow's credentials chain."""
    path = os.fspath(path)
    if os.path.abspath(local) == os.path.abspath(path):
        return
    for root, _, files in os.walk(local):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local)
            with open(src, "rb") as f:
                write_bytes(join(path, rel), f.read())


def dirname(path) -> str:
    return os.fspath(Path(os.fspath(path)).parent)
