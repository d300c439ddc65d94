"""Random-access record sources for grain, and the one record format they all speak.

A record is msgpack {"image": encoded bytes (JPEG / PNG / WebP as found), "caption": utf-8
bytes, "label": int (-1: none), "key": str}. Storing the encoded image keeps shards at the size
of the source data; decoding happens in the pipeline, where a bad record is counted and skipped
instead of stopping a conversion job. Every source maps an index to such bytes, so the procedural
demo data, converted shards and TFDS ImageNet run through the very same pipeline.
"""
from __future__ import annotations

import io
from importlib import resources
from typing import Sequence

import msgpack
import numpy as np
from PIL import Image

from vtp_jax import paths
from vtp_jax.data import procedural

NO_LABEL = -1
IMAGENET_TEMPLATE = "a photo of a {}."


def encode_record(image: bytes, caption: str | bytes, label: int = NO_LABEL, key: str = "") -> bytes:
    if isinstance(caption, str):
        caption = caption.encode("utf-8")
    return msgpack.packb({"image": bytes(image), "caption": bytes(caption), "label": int(label), "key": str(key)})


def decode_record(data: bytes) -> dict:
    """Inverse of encode_record; raises ValueError on bytes that are not such a record."""
    try:
        record = msgpack.unpackb(data)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"not a msgpack record: {type(e).__name__}: {e}") from None
    if not isinstance(record, dict) or not isinstance(record.get("image"), bytes):
        raise ValueError(f"record without image bytes: {type(record).__name__}")
    caption = record.get("caption", b"")
    label = record.get("label", NO_LABEL)
    if isinstance(label, bool) or not isinstance(label, int) or not NO_LABEL <= label < 2 ** 31:
        raise ValueError(f"record with label {str(label)[:40]}: expected an int32 class, or {NO_LABEL} for none")
    return {"image": record["image"], "caption": caption if isinstance(caption, bytes) else str(caption).encode(),
            "label": label, "key": str(record.get("key", ""))}


def encode_image(pixels: np.ndarray, image_format: str = "png") -> bytes:
    """uint8 (H, W, 3) -> PNG (lossless, fast level) or JPEG (quality 95) bytes."""
    buf = io.BytesIO()
    if image_format == "png":
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    elif image_format == "jpeg":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    else:
        raise ValueError(f"image_format={image_format!r}: expected 'png' or 'jpeg'")
    return buf.getvalue()


class ProceduralSource:
    """grain RandomAccessDataSource of procedural records (see `procedural`); `num_records`
    bounds the epoch only because grain needs a length (default 2**31: effectively unbounded)."""

    def __init__(self, seed: int = 0, image_size: int = 64, num_records: int = 2 ** 31, image_format: str = "png",
                 max_objects: int = 2, sizes: tuple[str, ...] = tuple(procedural.SIZES)):
        if num_records <= 0:
            raise ValueError(f"num_records must be positive, got {num_records}")
        self.seed, self.image_size, self.num_records, self.image_format = seed, image_size, num_records, image_format
        self.max_objects, self.sizes = max_objects, tuple(sizes)

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> bytes:
        if not 0 <= index < self.num_records:
            raise IndexError(f"index {index} outside [0, {self.num_records})")
        ex = procedural.render_example(self.seed, int(index), self.image_size, self.max_objects, self.sizes)
        return encode_record(encode_image(ex["image"], self.image_format), ex["caption"], ex["label"], str(index))

    def __repr__(self):
        return f"ProceduralSource(seed={self.seed}, image_size={self.image_size}, num_records={self.num_records})"


def shard_paths(pattern: str | Sequence[str]) -> list[str]:
    """Sorted ArrayRecord files from a glob, a directory, a comma-separated list or a list."""
    patterns = pattern.split(",") if isinstance(pattern, str) else list(pattern)
    found = []
    for p in patterns:
        p = p.strip()
        if paths.isdir(p):
            p = paths.join(p, "*.array_record")
        found.extend(paths.glob(p))
    if not found:
        raise FileNotFoundError(f"no ArrayRecord shards match {pattern!r}; write them with `python -m vtp_jax.data.prepare`")
    return found


def array_record_source(pattern: str | Sequence[str]) -> "CheckedRecords":
    """grain source over shards written by `prepare` (one record per index, random access)."""
    return CheckedRecords(shard_paths(pattern))


class CheckedRecords:
    """ArrayRecord shards where a record that cannot be read (Riegeli's checksums catch a corrupt
    chunk) comes back as b"": `decode_record` refuses it, so the pipeline counts it as
    skipped/bad_record instead of stopping the run. A shard that cannot be opened at all is one
    ValueError naming it."""

    def __init__(self, files: Sequence[str]):
        import grain  # lazy: grain is a [train] dependency, sources' other readers need none of it

        try:
            self.source = grain.sources.ArrayRecordDataSource(list(files))
        except RuntimeError as e:  # the library does not say which shard: find it
            for f in files:
                try:
                    grain.sources.ArrayRecordDataSource([f])
                except RuntimeError as one:
                    raise ValueError(f"{f}: not a readable ArrayRecord file ({one})") from None
            raise ValueError(f"{list(files)[:3]}...: not readable as ArrayRecord files ({e})") from None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> bytes:
        try:
            return self.source[index]
        except RuntimeError:  # "Corrupted Riegeli/records file: chunk data hash mismatch" and the like
            return b""

    def __repr__(self):
        return f"CheckedRecords({self.source!r})"


def asset_lines(name: str) -> tuple[str, ...]:
    """The non-empty lines of a text file shipped in vtp_jax/data/assets/."""
    text = (resources.files("vtp_jax.data") / "assets" / name).read_text(encoding="utf-8")
    return tuple(line for line in text.split("\n") if line)


def imagenet_class_names() -> list[str]:
    """The 1000 human-readable ImageNet names OpenAI / OpenCLIP use for zero-shot prompts (OpenCLIP's
    IMAGENET_CLASSNAMES, shipped as data), in label order."""
    return list(asset_lines("imagenet_classes.txt"))


class TFDSSource:
    """grain source over a TFDS array_record dataset with (image, label), as records whose caption
    is `template` filled with the class name. Images stay encoded (SkipDecoding), so ImageNet goes
    through the same robust decode as every other source.

    For imagenet2012 the names are OpenAI's readable class names (TFDS only has WordNet ids);
    other datasets use their ClassLabel names.
    """

    def __init__(self, name: str = "imagenet2012", split: str = "train", data_dir: str | None = None,
                 template: str = IMAGENET_TEMPLATE, image_key: str = "image", label_key: str = "label"):
        import tensorflow_datasets as tfds

        self.name, self.split, self.template = name, split, template
        self.image_key, self.label_key = image_key, label_key
        self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                        decoders={image_key: tfds.decode.SkipDecoding()})
        if name.split(":")[0] == "imagenet2012":
            self.class_names = imagenet_class_names()
        else:
            self.class_names = [n.replace("_", " ") for n in self._source.dataset_info.features[label_key].names]

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> bytes:
        ex = self._source[int(index)]
        label = int(ex[self.label_key])
        return encode_record(ex[self.image_key], self.template.format(self.class_names[label]), label,
                             f"{self.name}/{self.split}/{index}")

    def __repr__(self):
        return f"TFDSSource({self.name!r}, split={self.split!r}, {len(self)} records)"
