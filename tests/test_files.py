"""Files from elsewhere (docs/files.md): each reader refuses what a crafted file declares beyond
the bytes it holds, in one error naming the file and the tensor or field, and reads the valid
files of its format. The random campaign over the same readers is tests/test_fuzz_readers.py."""
import io
import json
import os
import tarfile
import zipfile
from collections import Counter

import msgpack
import numpy as np
import pytest
import safetensors.numpy

import torch_files
from vtp_jax import config as config_lib
from vtp_jax.checkpoints import released, tokenizers
from vtp_jax.data import files, latents, prepare, sources

F32 = np.arange(4, dtype=np.float32)  # the storage of 4 elements every crafted tensor points into


# ------------------------------------------------------------------------------------------------
# torch.save zip files.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset,size,stride,needle", [
    (0, (64,), (1,), "shape (64,) has 64 elements, its storage 4"),  # 60 values from the heap, before
    (3, (2,), (-1,), "expected non-negative integers"),  # memory before the buffer, before
    (0, (10 ** 8,), (1000,), "shape (100000000,) has 100000000 elements"),  # SIGSEGV (exit 139), before
    (0, (2, 2), (1, 1000), "reads element 1001 of a storage of 4"),
    (5, (0,), (1,), "offset 5 reads element 5 of a storage of 4"),
    (0, (2,), (1.5,), "expected non-negative integers"),
    (0, (1,) * 40, (1,) * 40, "at most 32 dimensions"),
])
def test_torch_tensor_outside_its_storage_is_refused(tmp_path, offset, size, stride, needle):
    path = tmp_path / "latents_stats.pt"
    torch_files.save({"mean": torch_files.Tensor(F32, offset, size, stride), "std": torch_files.tensor(F32)}, path)
    with pytest.raises(ValueError) as e:
        files.read_torch_file(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: tensor ['mean']: ") and needle in msg and "\n" not in msg, msg
    with pytest.raises(ValueError, match=r"latents_stats.pt: tensor \['mean'\]"):
        latents.load_stats(str(path))


def _rewrite(path, change):
    """The zip at `path` with its members passed through change(name, bytes) -> bytes or None (dropped)."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            b = change(n, b)
            if b is not None:
                z.writestr(n, b)


@pytest.mark.parametrize("change,needle", [
    (lambda n, b: b[:-4] if n.endswith("data/0") else b, "storage '0' holds 12 bytes, its 4 float32 elements take 16"),
    (lambda n, b: None if n.endswith("data/0") else b, "storage '0' is not in the file"),
    (lambda n, b: b"middle" if n.endswith("byteorder") else b, "byteorder 'middle': expected 'little' or 'big'"),
    (lambda n, b: None if n.endswith("data.pkl") else b, "no data.pkl"),
    (lambda n, b: b[:3] if n.endswith("data.pkl") else b, "not a readable torch.save zip file"),
])
def test_torch_file_whose_members_disagree_is_refused(tmp_path, change, needle):
    path = tmp_path / "x.pt"
    torch_files.save({"mean": torch_files.tensor(F32)}, path)
    _rewrite(path, change)
    with pytest.raises(ValueError) as e:
        files.read_torch_file(str(path))
    assert str(e.value).startswith(f"{path}: ") and needle in str(e.value), str(e.value)


def test_torch_zip_bomb_member_is_refused(tmp_path):
    """A deflated data.pkl declaring 64 MB in a file of a few hundred KB: refused before inflating."""
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb/data.pkl", b"\0" * (64 << 20))
    assert os.path.getsize(path) < 1 << 20
    with pytest.raises(ValueError, match=r"bomb/data.pkl declares 67108864 bytes in an archive of \d+"):
        files.read_torch_file(str(path))


def test_torch_big_endian_shared_and_deeply_shared_objects(tmp_path):
    """A big-endian file reads to native values; a storage shared by two views is read once and
    each view is its own array; an object sharing sub-objects 2^60 ways is built in linear time."""
    a = np.arange(6, dtype=np.float32)
    torch_files.save({"x": torch_files.Tensor(a, 0, (2, 3), (3, 1)), "t": torch_files.Tensor(a, 0, (3, 2), (1, 3))},
                     tmp_path / "big.pt", byteorder="big")
    got = files.read_torch_file(str(tmp_path / "big.pt"))
    np.testing.assert_array_equal(got["x"], a.reshape(2, 3))
    np.testing.assert_array_equal(got["t"], a.reshape(2, 3).T)
    assert got["x"].dtype == np.float32 and got["x"].dtype.isnative
    shared = [torch_files.tensor(F32)]
    for _ in range(60):
        shared = [shared, shared]
    torch_files.save({"deep": shared}, tmp_path / "deep.pt")
    got = files.read_torch_file(str(tmp_path / "deep.pt"))["deep"]
    assert got[0] is got[1]  # built once, as the pickle shares it
    for _ in range(59):
        got = got[0]
    np.testing.assert_array_equal(got[0][0], F32)


# ------------------------------------------------------------------------------------------------
# safetensors: the one reader (the library), for release folders, latent shards and state dicts.
# ------------------------------------------------------------------------------------------------
def _with_header(path, change):
    blob = open(path, "rb").read()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    change(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    open(path, "wb").write(len(h).to_bytes(8, "little") + h + blob[8 + n:])


@pytest.mark.parametrize("dtype", [5, ["F32"], None])
def test_safetensors_non_string_dtype(tmp_path, dtype):
    """Commit 6fdf4c2's case, through the one reader and each of its callers: one error naming the
    file and the tensor, not a TypeError."""
    def bad(header):
        header["latents"]["dtype"] = dtype

    shard = tmp_path / "lat" / "latents_rank00_shard000.safetensors"
    shard.parent.mkdir()
    safetensors.numpy.save_file({"latents": np.zeros((2, 3, 2, 2), np.float32), "latents_flip": np.zeros((2, 3, 2, 2),
                                 np.float32), "labels": np.zeros(2, np.int64)}, str(shard))
    _with_header(shard, bad)
    needle = f"tensor 'latents' has dtype {dtype}: expected a string such as 'F32'"
    for read in (files.read_safetensors, lambda p: latents.OfficialLatentSource(os.path.dirname(p))):
        with pytest.raises(ValueError) as e:
            read(str(shard))
        assert str(e.value).startswith(f"{shard}: not a safetensors file") and needle in str(e.value), str(e.value)
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "config.json").write_text("{}")
    os.replace(shard, tmp_path / "release" / "model.safetensors")
    with pytest.raises(released.CheckpointError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        released.load_release(str(tmp_path / "release"))


def test_safetensors_keeps_dtypes_and_casts_on_request(tmp_path):
    import ml_dtypes

    t = {"w": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16), "y": np.arange(3)}
    safetensors.numpy.save_file(t, str(tmp_path / "x.safetensors"))
    got = files.read_safetensors(str(tmp_path / "x.safetensors"))
    assert got["w"].dtype == ml_dtypes.bfloat16 and got["y"].dtype == np.int64
    got = files.read_safetensors(str(tmp_path / "x.safetensors"), float_dtype=np.float32)
    assert got["w"].dtype == np.float32 and got["y"].dtype == np.int64
    np.testing.assert_array_equal(got["w"], np.arange(6).reshape(2, 3))


# ------------------------------------------------------------------------------------------------
# .npz archives.
# ------------------------------------------------------------------------------------------------
def test_npz_header_claiming_more_than_the_member_holds(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3))
    lie = io.BytesIO()  # a well-formed .npy header claiming 10^12 float64 over 3 values
    np.lib.format.write_array_header_1_0(lie, {"descr": "<f8", "fortran_order": False, "shape": (10 ** 12,)})
    _rewrite(path, lambda n, b: lie.getvalue() + np.zeros(3).tobytes() if n == "mu.npy" else b)
    with files.NpzArchive(str(path)) as a:
        assert a.files == ["mu", "sigma"]
        np.testing.assert_array_equal(a["sigma"], np.eye(3))
        with pytest.raises(ValueError, match=r"ref.npz: array 'mu': the header declares \(1000000000000,\) float64 "
                                             r"\(8000000000000 bytes\), the member holds 24"):
            a["mu"]


def test_npz_objects_bombs_and_layouts(tmp_path):
    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
    with files.NpzArchive(str(tmp_path / "obj.npz")) as a, pytest.raises(ValueError, match="object array .* refused"):
        a["a"]
    np.savez_compressed(tmp_path / "bomb.npz", a=np.zeros(1 << 22))
    with files.NpzArchive(str(tmp_path / "bomb.npz")) as a, pytest.raises(ValueError, match="a zip bomb"):
        a["a"]
    fortran = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    np.savez_compressed(tmp_path / "ok.npz", f=fortran, i=np.arange(5, dtype=np.int16))
    with files.NpzArchive(str(tmp_path / "ok.npz")) as a:
        np.testing.assert_array_equal(a["f"], fortran)
        assert a["i"].dtype == np.int16 and a["i"].flags.writeable
        with pytest.raises(KeyError, match="no array 'x'"):
            a["x"]
    np.save(tmp_path / "one.npy", np.zeros(2))
    with pytest.raises(ValueError, match="one.npy: a single .npy array, expected an .npz archive"):
        files.NpzArchive(str(tmp_path / "one.npy"))
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.npz: not an .npz archive"):
        files.NpzArchive(str(tmp_path / "empty.npz"))


# ------------------------------------------------------------------------------------------------
# Records, tars, workdir config.json.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", [[1], 1.5, float("inf"), 2 ** 40, -2, True, "3"])
def test_record_with_a_bad_label_is_a_bad_record(label):
    data = msgpack.packb({"image": b"x", "caption": b"", "label": label, "key": ""})
    with pytest.raises(ValueError, match="expected an int32 class"):
        sources.decode_record(data)


def test_corrupt_array_record_is_a_skip_and_a_short_shard_an_error(tmp_path):
    from array_record.python import array_record_module

    path = str(tmp_path / "x.array_record")
    w = array_record_module.ArrayRecordWriter(path, "group_size:1,uncompressed")
    records = [sources.encode_record(bytes([i]) * 200, f"caption {i}", i) for i in range(20)]
    for r in records:
        w.write(r)
    w.close()
    blob = bytearray(open(path, "rb").read())
    assert blob.count(b"caption 7") == 1
    blob[blob.find(b"caption 7") + 3] ^= 0xFF  # one record's bytes: its chunk's checksum fails
    open(path, "wb").write(bytes(blob))
    src = sources.array_record_source(path)
    got = [src[i] for i in range(len(src))]
    assert got[7] == b"" and [g for i, g in enumerate(got) if i != 7] == records[:7] + records[8:]
    with pytest.raises(ValueError, match="not a msgpack record|record without image"):
        sources.decode_record(got[7])
    (tmp_path / "short.array_record").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match=r"short.array_record: not a readable ArrayRecord file"):
        sources.array_record_source([path, str(tmp_path / "short.array_record")])


def test_tar_member_names_never_become_paths_and_big_members_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "MAX_MEMBER_BYTES", 1000)
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(png, "PNG")
    tar_path = tmp_path / "shard.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in (("../../escape/a.png", png.getvalue()), ("../../escape/a.txt", b"a cat"),
                           ("/abs/b.png", png.getvalue()), ("big.png", b"\0" * 5000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    counts = Counter()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        records = [sources.decode_record(r) for r in prepare._webdataset_records([str(tar_path)], counts)]
    finally:
        os.chdir(cwd)
    assert sorted(r["key"] for r in records) == ["shard.tar/../../escape/a", "shard.tar//abs/b"]
    assert [r["caption"] for r in records if r["key"].endswith("a")] == [b"a cat"]
    assert counts["skipped/too_large_member"] == 1
    assert sorted(os.listdir(tmp_path)) == ["shard.tar"] and not os.path.exists(tmp_path.parent.parent / "escape")


def test_workdir_config_with_wrong_types_is_one_error_naming_the_fields(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    cfg = {"job": "pretrain", "model": {"width": "big", "depth": 2, "decoder": 3, "gone": 1},
           "objectives": {"l_clip": "x"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(config_lib.ConfigError) as e:
        tokenizers.load_workdir(str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'config.json'}: ") and "\n" not in msg, msg
    for needle in ("model.width=big: expected int", "model.decoder=3: expected an object of fields",
                   "objectives.l_clip=x: expected float"):
        assert needle in msg, msg
    assert "gone" not in msg  # a field today's schema dropped: an older run, not an error
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(config_lib.ConfigError, match="config.json: expected a JSON object of config fields, got list"):
        tokenizers.load_workdir(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(config_lib.ConfigError, match="config.json: not a readable config.json"):
        tokenizers.load_workdir(str(tmp_path))
