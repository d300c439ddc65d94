"""`python -m vtp_jax.data.prepare`: webdataset tars, image folders, TFDS and procedural data
into ArrayRecord shards + manifest; parallel, idempotent, resumable after an interruption."""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from vtp_jax import config as config_lib
from vtp_jax.data import pipeline, prepare, procedural, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image_bytes(seed, fmt="JPEG", size=(24, 20)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def read_shards(folder):
    from array_record.python.array_record_module import ArrayRecordReader

    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    records = []
    for shard in manifest["shards"]:
        reader = ArrayRecordReader(os.path.join(folder, shard["shard"]))
        part = [sources.decode_record(r) for r in reader.read_all()]
        reader.close()
        assert len(part) == shard["records"]
        records += part
    return manifest, records


def mtimes(folder):
    return {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder) if n.endswith(".array_record")}


def test_procedural_cli_parallel_idempotent_and_readable_by_the_pipeline(tmp_path):
    out = str(tmp_path / "shards")
    cmd = [sys.executable, "-m", "vtp_jax.data.prepare", "procedural", "--num_records", "30", "--image_size", "32",
           "--seed", "2", "--num_shards", "3", "--workers", "2", "--output", out]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote 30 records in 3 shards" in done.stderr
    manifest, records = read_shards(out)
    assert manifest["records"] == 30 and [s["records"] for s in manifest["shards"]] == [10, 10, 10]
    for i, r in enumerate(records):  # contiguous index ranges: shard order is generator order
        ex = procedural.render_example(2, i, 32)
        assert r["caption"].decode() == ex["caption"] and r["label"] == ex["label"] and r["key"] == str(i)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r["image"]))), ex["image"])  # PNG: lossless
    before = mtimes(out)
    again = prepare.main(cmd[3:])  # same request, in process: nothing rewritten
    assert again == manifest and mtimes(out) == before

    c = config_lib.data_config()
    c.source, c.paths = "array_record", os.path.join(out, "*.array_record")
    c.image_size, c.global_crops_size, c.local_crops_size, c.patch_size, c.context_length = 32, 32, 16, 8, 16
    c.batch_clip, c.batch_ssl, c.batch_rec, c.local_crops_number, c.read_threads = 6, 2, 2, 1, 2
    batch = next(pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1))
    assert batch["clip_images"].shape == (6, 32, 32, 3) and batch["ssl_masks"].shape == (2, 2, 4, 4)


def test_interrupted_or_changed_requests(tmp_path):
    out = str(tmp_path)
    args = ["procedural", "--num_records", "12", "--image_size", "16", "--num_shards", "3", "--workers", "1",
            "--output", out]
    first = prepare.main(args)
    before = mtimes(out)
    os.remove(os.path.join(out, "records-00001-of-00003.array_record"))  # an interrupted run
    second = prepare.main(args)
    after = mtimes(out)
    assert second == first
    assert after["records-00000-of-00003.array_record"] == before["records-00000-of-00003.array_record"]
    assert after["records-00002-of-00003.array_record"] == before["records-00002-of-00003.array_record"]
    third = prepare.main(args[:-4] + ["--num_shards", "2", "--output", out])  # a different request: rebuilt
    assert third["fingerprint"] != first["fingerprint"] and third["records"] == 12
    assert sorted(mtimes(out)) == ["records-00000-of-00002.array_record", "records-00001-of-00002.array_record"]


def add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars(tmp_path):
    jpg, png = image_bytes(0), image_bytes(1, "PNG")
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        add(tar, "000000000.jpg", jpg)
        add(tar, "000000000.txt", b"a dog on a beach")
        add(tar, "000000000.json", b'{"url": "http://x", "width": 24}')
        add(tar, "000000000.cls", b"7\n")
        add(tar, "000000001.png", png)
        add(tar, "000000001.txt", "caf\u00e9 au lait".encode())
        add(tar, "000000002.txt", b"caption without image")  # skipped: no image
        add(tar, "000000003.jpg", b"<html>404</html>")  # skipped: not an image
        add(tar, "000000003.txt", b"broken download")
    with tarfile.open(tmp_path / "00001.tar", "w") as tar:
        add(tar, "000010000.jpg", jpg)
        add(tar, "000010000.txt", b"\xff\xfe latin junk")  # repaired: not UTF-8
        add(tar, "000010001.jpg", image_bytes(2))  # repaired: no caption
        add(tar, "000010002.jpg", b"")  # skipped: empty
        add(tar, "000010002.txt", b"empty file")
    out = tmp_path / "out"
    manifest = prepare.main(["webdataset", "--input", str(tmp_path / "*.tar"), "--output", str(out),
                             "--num_shards", "4", "--workers", "1"])
    assert manifest["num_shards"] == 2  # one shard per tar at most
    assert manifest["records"] == 4
    assert manifest["skipped"] == {"no_image": 1, "not_an_image": 1, "empty_image": 1}
    assert manifest["converted"] == {"caption_not_utf8": 1, "no_caption": 1}
    _, records = read_shards(str(out))
    by_key = {r["key"]: r for r in records}
    assert set(by_key) == {"00000.tar/000000000", "00000.tar/000000001", "00001.tar/000010000", "00001.tar/000010001"}
    first = by_key["00000.tar/000000000"]
    assert first["image"] == jpg and first["caption"] == b"a dog on a beach" and first["label"] == 7
    assert by_key["00000.tar/000000001"]["image"] == png
    assert by_key["00000.tar/000000001"]["caption"].decode() == "caf\u00e9 au lait"
    assert by_key["00001.tar/000010000"]["caption"].decode() == "\ufffd\ufffd latin junk"
    assert by_key["00001.tar/000010001"]["caption"] == b"" and by_key["00001.tar/000010001"]["label"] == -1


@pytest.mark.parametrize("captions", ["sidecar", "jsonl", "tsv"])
def test_image_folder(tmp_path, captions):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    files = {"a.jpg": image_bytes(0), "sub/b.png": image_bytes(1, "PNG"), "sub/c.webp": image_bytes(2, "WEBP")}
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "notes.md").write_text("not an image")
    text = {"a.jpg": "first", "sub/b.png": "second", "sub/c.webp": "third"}
    manifest_args = []
    if captions == "sidecar":
        for name, caption in text.items():
            (root / (os.path.splitext(name)[0] + ".txt")).write_text(caption)
    elif captions == "jsonl":
        path = tmp_path / "captions.jsonl"
        path.write_text("\n".join(json.dumps({"file": n, "caption": c, "label": i}) for i, (n, c) in enumerate(text.items())))
        manifest_args = ["--manifest", str(path)]
    else:
        path = tmp_path / "captions.tsv"
        path.write_text("".join(f"{n}\t{c}\n" for n, c in text.items()))
        manifest_args = ["--manifest", str(path)]
    manifest = prepare.main(["folder", "--input", str(root), "--output", str(tmp_path / "out"), "--num_shards", "2",
                             "--workers", "1", *manifest_args])
    assert manifest["records"] == 3 and manifest["skipped"] == {}
    _, records = read_shards(str(tmp_path / "out"))
    assert {r["key"]: (r["caption"].decode(), r["image"]) for r in records} == {n: (text[n], files[n]) for n in files}
    if captions == "jsonl":
        assert sorted(r["label"] for r in records) == [0, 1, 2]


def test_tfds_to_shards(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=5):
        manifest = prepare.main(["tfds", "--input", "imagenet2012", "--split", "validation", "--output", str(tmp_path),
                                 "--num_shards", "2", "--workers", "1"])
        source = sources.TFDSSource("imagenet2012", "validation")
        expected = [sources.decode_record(source[i]) for i in range(5)]
    assert manifest["records"] == 5 and [s["records"] for s in manifest["shards"]] == [2, 3]
    _, records = read_shards(str(tmp_path))
    assert records == expected


def test_cli_errors():
    with pytest.raises(SystemExit):
        prepare.parse_args(["webdataset", "--output", "x"])  # no --input
    with pytest.raises(FileNotFoundError, match="no input matches"):
        prepare.main(["webdataset", "--input", "/nonexistent/*.tar", "--output", "/tmp/unused-vtp-prepare"])
    with pytest.raises(ValueError, match="--num_shards must be positive"):
        prepare.main(["procedural", "--num_shards", "0", "--output", "/tmp/unused-vtp-prepare"])
