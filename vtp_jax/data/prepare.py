"""Convert image-caption data into ArrayRecord shards of `sources.encode_record` records.

    python -m vtp_jax.data.prepare webdataset --input 'datacomp/*.tar' --output shards/ --num_shards 64
    python -m vtp_jax.data.prepare folder --input photos/ [--manifest captions.jsonl|.tsv] --output shards/
    python -m vtp_jax.data.prepare tfds --input imagenet2012 --split train --output shards/
    python -m vtp_jax.data.prepare procedural --num_records 100000 --image_size 64 --output shards/

Sources: (a) webdataset tars as img2dataset writes them (key.jpg|png|webp + key.txt, optional
key.json / key.cls), (b) a folder of images with sidecar .txt captions or a jsonl
({"file", "caption", "label"}) / tsv (file<TAB>caption) manifest, (c) a TFDS dataset with
image + label (captions from class names), (d) the procedural generator.

Shards are written in parallel (one process per shard, a progress bar over records), each to a
temporary file renamed when complete, with a sidecar recording what it was built from.
`manifest.json` sums counts, skipped / converted records by reason, and shard hashes. Re-running
the same command is a no-op; after an interruption only missing shards are rebuilt; a changed
input or option rebuilds everything. Records are screened cheaply here (identifiable image,
UTF-8 caption); full decoding, with its own counters, happens in the training pipeline.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import io
import json
import multiprocessing
import os
import sys
import tarfile
import tempfile
from collections import Counter
from typing import Callable, Iterator, Sequence

from PIL import Image

from vtp_jax import paths
from vtp_jax.data import sources

FORMAT = "vtp-records-v1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MAX_MEMBER_BYTES = 64 << 20  # a tar member larger than any image-caption file: skipped, never read into memory
MANIFEST = "manifest.json"
_PARTS = ".parts"


def _screen(image: bytes, caption: bytes | str | None, counts: Counter) -> tuple[bytes, str] | None:
    """The record's image bytes and UTF-8 caption, or None (counted) if it is not worth storing."""
    if not image:
        counts["skipped/empty_image"] += 1
        return None
    try:
        Image.open(io.BytesIO(image))  # header only: identifies the format, decodes no pixels
    except Image.DecompressionBombError:
        counts["skipped/too_large"] += 1
        return None
    except Exception:  # PIL raises many types on garbage; all mean "not an image"
        counts["skipped/not_an_image"] += 1
        return None
    if caption is None:
        counts["converted/no_caption"] += 1
        caption = b""
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            caption = caption.decode("utf-8", errors="replace")
            counts["converted/caption_not_utf8"] += 1
    return image, caption.strip()


def _webdataset_records(tars: Sequence[str], counts: Counter) -> Iterator[bytes]:
    """Samples of img2dataset tars: members grouped by key (the name up to the first dot of the
    base name), in tar order. Keys without an image are counted as skipped/no_image. Each tar is
    read as a stream, so tars on gs:// are read in place; member names never become paths (no
    extraction) and members over MAX_MEMBER_BYTES are skipped unread."""
    for path in tars:
        groups: dict[str, dict[str, bytes]] = {}
        try:
            stream = paths.Path(path).open("rb")
            tar = tarfile.open(fileobj=stream, mode="r|*")
        except (tarfile.TarError, OSError):
            counts["skipped/unreadable_tar"] += 1
            continue
        with stream, tar:
            try:
                for member in tar:  # names only group a sample's files: nothing is written to a path
                    if not member.isfile():
                        continue
                    if member.size > MAX_MEMBER_BYTES or member.issparse():  # a gzip bomb, a hole-filled sparse file
                        counts["skipped/too_large_member"] += 1
                        if not member.issparse() and not _drained(tar.extractfile(member), member.size):
                            raise EOFError("the tar ends inside a member")  # tarfile would seek 1e20 bytes on
                        continue
                    folder, base = os.path.split(member.name)
                    if base.startswith("."):
                        continue
                    key, _, ext = base.partition(".")
                    groups.setdefault(os.path.join(folder, key), {})["." + ext.lower()] = tar.extractfile(member).read()
            except (tarfile.TarError, OSError, EOFError):
                counts["skipped/truncated_tar"] += 1
        for key, files in groups.items():
            image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
            if image is None:
                counts["skipped/no_image"] += 1
                continue
            label = sources.NO_LABEL
            if ".cls" in files:
                try:
                    label = int(files[".cls"].strip())
                except ValueError:
                    counts["converted/bad_label"] += 1
            screened = _screen(image, files.get(".txt"), counts)
            if screened:
                yield sources.encode_record(screened[0], screened[1], label, f"{os.path.basename(path)}/{key}")


def _drained(f, size: int) -> bool:
    """Reads and drops a member's bytes in 1 MB chunks; False if the stream ends first (a header
    that claims more than the tar holds, which tarfile's stream skip would loop over block by block)."""
    while size > 0:
        chunk = f.read(min(size, 1 << 20))
        if not chunk:
            return False
        size -= len(chunk)
    return True


def _folder_items(root: str, manifest: str | None) -> list[tuple[str, str | None, int]]:
    """(relative image path, caption or None for 'read the sidecar', label), sorted by path."""
    if manifest is None:
        files = []
        for folder, _, names in os.walk(root):
            files += [os.path.relpath(os.path.join(folder, n), root) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        return [(f, None, sources.NO_LABEL) for f in sorted(files)]
    items = []
    with open(manifest, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if manifest.endswith(".jsonl"):
                row = json.loads(line)
                items.append((row["file"], row.get("caption", ""), int(row.get("label", sources.NO_LABEL))))
            elif manifest.endswith(".tsv"):
                file, _, caption = line.rstrip("\n").partition("\t")
                items.append((file, caption, sources.NO_LABEL))
            else:
                raise ValueError(f"manifest {manifest!r}: expected a .jsonl or .tsv file")
    return sorted(items)


def _folder_records(root: str, items, counts: Counter) -> Iterator[bytes]:
    for rel, caption, label in items:
        try:
            with open(os.path.join(root, rel), "rb") as f:
                image = f.read()
        except OSError:
            counts["skipped/unreadable_file"] += 1
            continue
        if caption is None:
            sidecar = os.path.join(root, os.path.splitext(rel)[0] + ".txt")
            caption = open(sidecar, "rb").read() if os.path.exists(sidecar) else None
        screened = _screen(image, caption, counts)
        if screened:
            yield sources.encode_record(screened[0], screened[1], label, rel)


def _tfds_records(name: str, split: str, data_dir: str | None, indices: range, counts: Counter) -> Iterator[bytes]:
    source = sources.TFDSSource(name, split, data_dir)
    for i in indices:
        record = sources.decode_record(source[i])
        screened = _screen(record["image"], record["caption"], counts)
        if screened:
            yield sources.encode_record(screened[0], screened[1], record["label"], record["key"])


def _procedural_records(seed: int, image_size: int, image_format: str, indices: range, counts: Counter) -> Iterator[bytes]:
    source = sources.ProceduralSource(seed, image_size, max(indices.stop, 1), image_format)
    for i in indices:
        yield source[i]


def _write_shard(job: dict, report: Callable[[int], None]) -> dict:
    """Writes one shard (to a temporary name, renamed when complete) and its sidecar; `report`
    receives record counts for the progress bar."""
    from array_record.python.array_record_module import ArrayRecordWriter

    counts: Counter = Counter()
    kind, path = job["kind"], job["path"]
    if kind == "webdataset":
        records = _webdataset_records(job["inputs"], counts)
    elif kind == "folder":
        records = _folder_records(job["root"], job["items"], counts)
    elif kind == "tfds":
        records = _tfds_records(job["name"], job["split"], job["data_dir"], range(*job["range"]), counts)
    else:
        records = _procedural_records(job["seed"], job["image_size"], job["image_format"], range(*job["range"]), counts)
    tmp = os.path.join(tempfile.mkdtemp(prefix="vtp_jax_prepare_"), os.path.basename(path) + ".tmp")  # ArrayRecord
    writer = ArrayRecordWriter(tmp, "group_size:1")  # writes local files only; one record per chunk: random access
    digest, n = hashlib.sha256(), 0
    for record in records:
        writer.write(record)
        digest.update(record)
        n += 1
        if n % 64 == 0:
            report(64)
    writer.close()
    report(n % 64)
    size = os.path.getsize(tmp)
    paths.upload(tmp, path)  # whole shards only
    part = {"shard": os.path.basename(path), "fingerprint": job["fingerprint"], "records": n,
            "sha256": digest.hexdigest(), "bytes": size, "counts": dict(sorted(counts.items()))}
    paths.write_json(_part_path(path), part)
    return part


def _part_path(shard_path: str) -> str:
    return paths.join(paths.dirname(shard_path), _PARTS, os.path.basename(shard_path) + ".json")


def _expand(patterns: str) -> list[str]:
    found = []
    for p in patterns.split(","):
        matches = paths.glob(p.strip())
        if not matches:
            raise FileNotFoundError(f"no input matches {p.strip()!r}")
        found += matches
    return found


def _file_fingerprint(files: Sequence[str]) -> list:
    """[path, size, mtime] of each input: a changed input makes its shards stale (local or gs://)."""
    stats = [paths.Path(p).stat() for p in files]
    return [[p, int(st.length), int(st.mtime)] for p, st in zip(files, stats)]


def plan(args) -> tuple[dict, list[dict]]:
    """The request (what identifies the output) and one job per shard."""
    n = args.num_shards
    if n <= 0:
        raise ValueError(f"--num_shards must be positive, got {n}")
    if args.kind == "webdataset":
        tars = _expand(args.input)
        if n > len(tars):
            print(f"prepare: {len(tars)} tar files, so {len(tars)} shards instead of {n}", file=sys.stderr)
            n = len(tars)
        request = {"inputs": _file_fingerprint(tars)}
        splits = [{"inputs": tars[k::n]} for k in range(n)]
    elif args.kind == "folder":
        if not os.path.isdir(args.input):
            raise NotADirectoryError(f"--input {args.input!r} is not a directory")
        items = _folder_items(args.input, args.manifest)
        if not items:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {args.input!r}")
        files = [os.path.join(args.input, i[0]) for i in items if os.path.exists(os.path.join(args.input, i[0]))]
        sidecars = [os.path.splitext(f)[0] + ".txt" for f in files]
        request = {"inputs": _file_fingerprint(files + [s for s in sidecars if os.path.exists(s)]
                                               + ([args.manifest] if args.manifest else []))}
        splits = [{"root": args.input, "items": items[k * len(items) // n:(k + 1) * len(items) // n]} for k in range(n)]
    elif args.kind == "tfds":
        size = len(sources.TFDSSource(args.input, args.split, args.data_dir))
        request = {"name": args.input, "split": args.split, "data_dir": args.data_dir, "size": size}
        splits = [{"name": args.input, "split": args.split, "data_dir": args.data_dir,
                   "range": (k * size // n, (k + 1) * size // n)} for k in range(n)]
    elif args.kind == "procedural":
        size = args.num_records
        request = {"seed": args.seed, "image_size": args.image_size, "image_format": args.image_format, "size": size}
        splits = [{"seed": args.seed, "image_size": args.image_size, "image_format": args.image_format,
                   "range": (k * size // n, (k + 1) * size // n)} for k in range(n)]
    else:
        raise ValueError(f"unknown source kind {args.kind!r}")
    request = {"format": FORMAT, "kind": args.kind, "num_shards": n, "prefix": args.prefix, **request}
    fingerprint = hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()
    jobs = [{"kind": args.kind, "fingerprint": fingerprint,
             "path": os.path.join(args.output, f"{args.prefix}-{k:05d}-of-{n:05d}.array_record"), **split}
            for k, split in enumerate(splits)]
    return {**request, "fingerprint": fingerprint}, jobs


def _done(job: dict) -> dict | None:
    """The shard's sidecar if the shard exists and was built from this very request."""
    try:
        part = paths.read_json(_part_path(job["path"]))
    except (OSError, ValueError):
        return None
    if part.get("fingerprint") != job["fingerprint"] or not paths.exists(job["path"]):
        return None
    return part if paths.Path(job["path"]).stat().length == part["bytes"] else None


def _run_jobs(jobs: list[dict], workers: int, total: int | None) -> list[dict]:
    from tqdm import tqdm

    if workers <= 1 or len(jobs) <= 1:
        with tqdm(total=total, unit="rec", desc="prepare", file=sys.stderr) as bar:
            return [_write_shard(job, bar.update) for job in jobs]
    # spawn: the parent may hold threads (TF, JAX) that fork would copy in a locked state.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        progress = manager.Queue()
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool, \
                tqdm(total=total, unit="rec", desc="prepare", file=sys.stderr) as bar:
            futures = [pool.submit(_write_shard, job, progress.put) for job in jobs]
            pending = set(futures)
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=0.2)
                while not progress.empty():
                    bar.update(progress.get())
                for f in done:
                    f.result()  # re-raises a worker's error here
            while not progress.empty():
                bar.update(progress.get())
        return [f.result() for f in futures]


def prepare(args) -> dict:
    """Builds (or finds up to date) the shards and manifest that `args` describe; returns the manifest."""
    request, jobs = plan(args)
    paths.makedirs(paths.join(args.output, _PARTS))
    manifest_path = paths.join(args.output, MANIFEST)
    parts = {job["path"]: _done(job) for job in jobs}
    todo = [job for job in jobs if parts[job["path"]] is None]
    if not todo and paths.exists(manifest_path):
        manifest = paths.read_json(manifest_path)
        if manifest.get("fingerprint") == request["fingerprint"]:
            print(f"prepare: {args.output} is up to date ({manifest['records']} records)", file=sys.stderr)
            return manifest
    current = {os.path.basename(j["path"]) for j in jobs}
    for old in paths.glob(paths.join(args.output, f"{args.prefix}-*-of-*.array_record")):  # an earlier request's
        if os.path.basename(old) not in current:
            paths.remove(old)
            if paths.exists(_part_path(old)):
                paths.remove(_part_path(old))
    total = request.get("size") if args.kind in ("tfds", "procedural") else None
    for part in _run_jobs(todo, args.workers, total):
        parts[paths.join(args.output, part["shard"])] = part
    ordered = [parts[job["path"]] for job in jobs]
    counts: Counter = Counter()
    for part in ordered:
        counts.update(part["counts"])
    manifest = {
        **request,
        "records": sum(p["records"] for p in ordered),
        "skipped": {k.split("/", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("skipped/")},
        "converted": {k.split("/", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("converted/")},
        "shards": [{k: p[k] for k in ("shard", "records", "bytes", "sha256")} for p in ordered],
    }
    paths.write_json(manifest_path, manifest, indent=2)  # written whole, at once
    skipped = ", ".join(f"{k}: {v}" for k, v in manifest["skipped"].items()) or "none"
    print(f"prepare: wrote {manifest['records']} records in {len(jobs)} shards to {args.output}; skipped: {skipped}",
          file=sys.stderr)
    return manifest


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vtp_jax.data.prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("webdataset", "folder", "tfds", "procedural"))
    p.add_argument("--input", default="", help="tar glob(s) (comma-separated) | image folder | TFDS name")
    p.add_argument("--output", required=True, help="folder for the shards and manifest.json")
    p.add_argument("--num_shards", type=int, default=16)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    p.add_argument("--prefix", default="records")
    p.add_argument("--manifest", default=None, help="folder: captions as .jsonl (file, caption, label) or .tsv")
    p.add_argument("--split", default="train", help="tfds split")
    p.add_argument("--data_dir", default=None, help="tfds data_dir")
    p.add_argument("--num_records", type=int, default=100_000, help="procedural")
    p.add_argument("--image_size", type=int, default=64, help="procedural")
    p.add_argument("--seed", type=int, default=0, help="procedural")
    p.add_argument("--image_format", choices=("png", "jpeg"), default="png", help="procedural")
    args = p.parse_args(argv)
    if args.kind in ("webdataset", "folder", "tfds") and not args.input:
        p.error(f"{args.kind} needs --input")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    return prepare(parse_args(argv))


if __name__ == "__main__":
    main()
