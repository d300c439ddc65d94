"""Bad records never stop the pipeline: each is repaired or skipped and counted by reason,
also when the counting happens in grain worker processes."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vtp_jax import config as config_lib
from vtp_jax import images
from vtp_jax.data import pipeline, sources


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(seed, size=(40, 32)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels in a file of a few dozen bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated by 90 degrees
    return encoded(photo(1, (40, 20)), "JPEG", exif=exif.tobytes())


def rgba_png() -> bytes:
    pixels = np.zeros((20, 20, 4), np.uint8)
    pixels[:10] = (200, 10, 10, 255)  # top half opaque red, bottom half fully transparent black
    return encoded(Image.fromarray(pixels, "RGBA"), "PNG")


def corpus() -> tuple[list[bytes], dict[str, int], int]:
    """(records, expected non-zero counters, number of usable records); the last record is good
    so that every bad one is counted inside some batch."""
    good = [sources.encode_record(encoded(photo(i), "JPEG"), f"photo {i}") for i in range(6)]
    jpeg = encoded(photo(99), "JPEG")
    bad = [
        (sources.encode_record(jpeg[:len(jpeg) // 2], "truncated"), "skipped/corrupt_image"),
        (sources.encode_record(b"", "zero bytes"), "skipped/empty_image"),
        (sources.encode_record(b"this is not an image", "text"), "skipped/not_an_image"),
        (b"\x00\x01 not a msgpack record", "skipped/bad_record"),
        (sources.encode_record(encoded(Image.new("RGB", (1, 1)), "PNG"), "one pixel"), "skipped/too_small"),
        (sources.encode_record(png_bomb(30000, 30000), "a bomb beyond PIL's own limit"), "skipped/too_large"),
        (sources.encode_record(encoded(photo(3, (80, 80)), "PNG"), "over max_image_pixels"), "skipped/too_large"),
        (sources.encode_record(jpeg, "   "), "skipped/empty_caption"),
        (sources.encode_record(encoded(photo(4).convert("CMYK"), "JPEG"), "cmyk"), "converted/mode"),
        (sources.encode_record(encoded(photo(5).convert("L"), "PNG"), "grey"), "converted/mode"),
        (sources.encode_record(rgba_png(), "rgba"), "converted/mode"),
        (sources.encode_record(encoded(photo(6).convert("P"), "PNG"), "palette"), "converted/mode"),
        (sources.encode_record(encoded(Image.fromarray(np.full((20, 20), 40000, np.uint16)), "PNG"), "16 bit"),
         "converted/mode"),
        (sources.encode_record(exif_rotated_jpeg(), "sideways"), "converted/exif_rotated"),
        (sources.encode_record(jpeg, " ".join(["word"] * 100)), "converted/caption_truncated"),
        (sources.encode_record(jpeg, b"caf\xe9 \xff\xfe latin-1"), "converted/caption_not_utf8"),
    ]
    records, expected = [], {}
    for i, (record, reason) in enumerate(bad):
        records += [record, good[i % len(good)]]
        expected[reason] = expected.get(reason, 0) + 1
    usable = len(records) - sum(v for k, v in expected.items() if k.startswith("skipped/"))
    return records, expected, usable


def write_shard(path, records):
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()
    return str(path)


def corpus_config(paths, **overrides):
    c = config_lib.data_config()
    c.source, c.paths = "array_record", paths
    c.image_size, c.global_crops_size, c.local_crops_size, c.patch_size = 16, 16, 8, 8
    c.context_length, c.local_crops_number, c.read_threads = 16, 1, 2
    c.min_image_side, c.max_image_pixels = 8, 5000  # the 80 x 80 PNG is "huge" here
    for k, v in overrides.items():
        c[k] = v
    return c


def test_bad_records_are_skipped_or_repaired_and_counted(tmp_path):
    records, expected, usable = corpus()
    path = write_shard(tmp_path / "bad.array_record", records)
    c = corpus_config(path, batch_clip=1, batch_ssl=1, batch_rec=1, shuffle=False, num_epochs=1)
    it = pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1)
    batches = list(it)
    assert len(batches) == usable
    assert all(np.isfinite(b["clip_images"]).all() and b["ssl_global"].shape == (1, 2, 16, 16, 3) for b in batches)
    counts = it.counters()
    assert {k: v for k, v in counts.items() if v} == expected
    assert set(counts) == set(pipeline.COUNTERS)


def test_a_source_of_only_bad_records_fails_clearly(tmp_path):
    path = write_shard(tmp_path / "junk.array_record", [b"junk"] * 300)  # long epochs: grain reshuffles per epoch
    it = pipeline.make_train_iterator(corpus_config(path, batch_clip=1, batch_ssl=0, batch_rec=0), seed=0,
                                      process_index=0, process_count=1)
    with pytest.raises(RuntimeError, match="records in a row could not be used.*skipped/bad_record"):
        next(it)


def test_decode_repairs():
    kw = dict(max_pixels=10 ** 8, min_side=1)
    img, conv = images.decode_image(exif_rotated_jpeg(), **kw)
    assert img.size == (20, 40) and conv == ["exif_rotated"]  # upright: 40 x 20 stored, rotated 90 degrees
    img, conv = images.decode_image(rgba_png(), **kw)
    pixels = np.asarray(img)
    assert conv == ["mode_converted"] and img.mode == "RGB"
    assert np.array_equal(pixels[15, 5], (255, 255, 255)) and np.array_equal(pixels[5, 5], (200, 10, 10))
    img, _ = images.decode_image(encoded(Image.fromarray(np.full((4, 4), 65535, np.uint16)), "PNG"), **kw)
    assert np.all(np.asarray(img) == 255)  # 16-bit white stays white instead of clipping garbage
    img, _ = images.decode_image(encoded(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG"), **kw)
    assert np.all(np.asarray(img) >= 250)  # no ink = white
    with pytest.raises(images.DecodeError, match="too_large: 30000x30000|too_large"):
        images.decode_image(png_bomb(30000, 30000), **kw)
    with pytest.raises(images.DecodeError, match="too_large: 3000x3000 > max_pixels=1000000"):
        images.decode_image(png_bomb(3000, 3000), max_pixels=10 ** 6, min_side=1)


def test_counts_cross_worker_processes_and_resume_exactly(tmp_path):
    records, expected, _ = corpus()
    path = write_shard(tmp_path / "bad.array_record", records)
    c = corpus_config(path, batch_clip=4, batch_ssl=2, batch_rec=2, num_workers=2)
    fresh = pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1)
    reference = [next(fresh) for _ in range(3)]
    middle = fresh.get_state()
    reference += [next(fresh) for _ in range(3)]
    state = fresh.get_state()
    counts = fresh.counters()
    fresh.close()
    assert counts["skipped/bad_record"] >= 1 and sum(counts.values()) >= len(expected)  # seen from the parent
    resumed = pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1)
    resumed.set_state(middle)
    try:
        for k in range(3, 6):
            batch = next(resumed)
            assert all(batch[key].tobytes() == reference[k][key].tobytes() for key in batch), k
        assert resumed.get_state() == state  # counters included
    finally:
        resumed.close()
