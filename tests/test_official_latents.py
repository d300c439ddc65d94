"""The release's latent statistics and the official latent shards, as the DiT job reads them.

Files are written here in the official layouts: `latents_stats.pt` with torch.save of
{'mean', 'std'} as 1 x C x 1 x 1 float32 tensors (LightningDiT's ImgLatentDataset cache, which VTP
ships for S / B / L), and `latents_rank<RR>_shard<SSS>.safetensors` with `latents` /
`latents_flip` (N, C, H, W) and `labels` (N,) int64 (extract_features_vtp.py). What the DiT sees is
checked against NumPy: ImgLatentDataset's (z - mean) / std * multiplier on NCHW, then NHWC.
"""
import os
import pickle
import zipfile

import jax
import ml_collections
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import tiny
import torch_files
from vtp_jax.data import files
from vtp_jax.data import latents as latents_lib

C, H, W = 6, 4, 4  # latents (N, C, H, W); non-square would also do, but the release's are square


def write_release_stats(path, mean, std):
    """torch.save({'mean': (1, C, 1, 1), 'std': (1, C, 1, 1)}) as ImgLatentDataset writes it, in
    torch's zip layout (tests/torch_files.py, checked against torch in benchmarks/RESULTS.md)."""
    torch_files.save({"mean": torch_files.tensor(np.asarray(mean, np.float32).reshape(1, -1, 1, 1)),
                      "std": torch_files.tensor(np.asarray(std, np.float32).reshape(1, -1, 1, 1))}, str(path),
                     archive=os.path.basename(str(path))[:-3])
    return str(path)


def write_official_shards(folder, counts, seed=0, dtype=np.float32, classes=10, chw=(C, H, W)):
    """Shards as extract_features_vtp.py names and fills them; returns (latents, flips, labels) in
    ImgLatentDataset's order (sorted file names, then rows)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    names = sorted(f"latents_rank{r:02d}_shard{s:03d}.safetensors" for r, s in counts)
    out = []
    for name in names:
        n = counts[int(name[12:14]), int(name[20:23])]
        z = (0.3 + 0.2 * rng.standard_normal((n, *chw))).astype(dtype)
        z_flip = (0.3 + 0.2 * rng.standard_normal((n, *chw))).astype(dtype)
        y = rng.integers(0, classes, n).astype(np.int64)
        safetensors.numpy.save_file({"latents": z, "latents_flip": z_flip, "labels": y}, os.path.join(folder, name),
                                    metadata={"total_size": str(n), "dtype": "torch.float32", "device": "cpu"})
        out.append((z, z_flip, y))
    return tuple(np.concatenate([o[i] for o in out]) for i in range(3))


# ------------------------------------------------------------------------------------------
# torch.save files without torch.
# ------------------------------------------------------------------------------------------
def test_torch_file_reader_reads_torch_layout(tmp_path):
    """Strided views of one storage, offsets, every dtype the latents come in, parameters and nested
    containers, written in torch's layout (benchmarks/torch_files_vs_torch.py: torch.load reads these
    files to the same tensors, and read_torch_file reads torch.save's files to the same arrays)."""
    import collections

    base = np.arange(24, dtype=np.float32)
    rng = np.random.default_rng(0)
    mean, half = rng.standard_normal((1, C, 1, 1)).astype(np.float32), rng.standard_normal((3, 2)).astype(np.float16)
    bf16 = rng.standard_normal(5).astype(ml_dtypes.bfloat16)
    obj = {"mean": torch_files.tensor(mean), "t": torch_files.Tensor(base, 0, (6, 4), (1, 6)),
           "slice": torch_files.Tensor(base, 6, (2, 3), (6, 2)), "half": torch_files.tensor(half),
           "bf16": torch_files.tensor(bf16), "long": torch_files.tensor(np.arange(7)),
           "param": torch_files.tensor(np.ones((2, 2), np.float32), parameter=True),
           "nested": [torch_files.tensor(np.zeros(3, np.float32)), {"k": (1, "s", 2.5)}],
           "od": collections.OrderedDict(a=torch_files.tensor(np.float32(3.0)))}
    torch_files.save(obj, tmp_path / "x.pt")
    got = files.read_torch_file(str(tmp_path / "x.pt"))
    grid = base.reshape(4, 6)  # the NumPy views the strides describe
    for k, want in (("mean", mean), ("t", grid.T), ("slice", grid[1:3, ::2]), ("half", half), ("bf16", bf16),
                    ("long", np.arange(7))):
        assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
        np.testing.assert_array_equal(got[k], want)
    np.testing.assert_array_equal(got["param"], np.ones((2, 2), np.float32))
    np.testing.assert_array_equal(got["nested"][0], np.zeros(3, np.float32))
    assert got["nested"][1] == {"k": (1, "s", 2.5)} and isinstance(got["od"], collections.OrderedDict)
    assert got["od"]["a"].shape == () and float(got["od"]["a"]) == 3.0


def test_torch_file_reader_refuses_code(tmp_path):
    """A pickle naming anything but tensors and containers is refused before anything runs."""
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"mean": Evil()}, protocol=2))
    with pytest.raises(ValueError, match=r"evil.pt: \w+\.system is not a tensor, storage or container: refused"):
        files.read_torch_file(str(path))
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ValueError, match="not a readable torch.save zip file"):
        files.read_torch_file(__file__)


# ------------------------------------------------------------------------------------------
# Latent statistics.
# ------------------------------------------------------------------------------------------
def test_load_stats_release_file_and_folder(tmp_path):
    rng = np.random.default_rng(0)
    mean, std = rng.standard_normal(C).astype(np.float32), rng.uniform(0.05, 0.3, C).astype(np.float32)
    release = tmp_path / "vtp_l"
    release.mkdir()
    write_release_stats(release / "latents_stats.pt", mean, std)
    assert files.is_torch_zip(str(release / "latents_stats.pt"))
    for path in (release / "latents_stats.pt", release):  # the file or the folder holding it
        m, s = latents_lib.load_stats(str(path))
        assert m.shape == s.shape == (C,) and m.dtype == s.dtype == np.float32
        np.testing.assert_array_equal(m, mean)
        np.testing.assert_array_equal(s, std)


def test_load_stats_ours_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    mean, std = rng.standard_normal(C).astype(np.float32), rng.uniform(0.05, 0.3, C).astype(np.float32)
    ours = tmp_path / "ours"
    ours.mkdir()
    np.savez(ours / "stats.npz", mean=mean + 1, std=std + 1)
    np.testing.assert_array_equal(latents_lib.load_stats(str(ours))[0], mean + 1)
    np.testing.assert_array_equal(latents_lib.load_stats(str(ours / "stats.npz"))[1], std + 1)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        latents_lib.load_stats(str(tmp_path / "absent.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no latent statistics"):
        latents_lib.load_stats(str(tmp_path / "empty"))
    np.savez(tmp_path / "bad.npz", mean=np.zeros((2, 3)), std=np.ones((2, 3)))
    with pytest.raises(ValueError, match="per-channel"):
        latents_lib.load_stats(str(tmp_path / "bad.npz"))


# ------------------------------------------------------------------------------------------
# Official latent shards.
# ------------------------------------------------------------------------------------------
COUNTS = {(0, 0): 5, (0, 1): 3, (1, 0): 4}  # (rank, shard) -> records


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_official_shards_read_nhwc_in_order(tmp_path, dtype):
    z, z_flip, y = write_official_shards(str(tmp_path), COUNTS, dtype=dtype)
    folder = str(tmp_path)
    assert latents_lib.is_official(folder)
    meta = latents_lib.read_meta(folder)
    assert meta["shape"] == [H, W, C] and meta["records"] == 12 and meta["num_classes"] == int(y.max()) + 1
    assert meta["tokenizer"] == "" and meta["format"] == "official"
    src = latents_lib.latent_source(folder)
    assert len(src) == 12
    for i in range(12):
        r = src[i]
        assert r["latent"].shape == (H, W, C) and r["latent"].dtype == np.float32
        np.testing.assert_array_equal(r["latent"], z[i].transpose(1, 2, 0).astype(np.float32))
        np.testing.assert_array_equal(r["latent_flip"], z_flip[i].transpose(1, 2, 0).astype(np.float32))
        assert r["label"] == y[i] and r["label"].dtype == np.int32
    with pytest.raises(IndexError):
        src[12]
    import pickle as pk

    again = pk.loads(pk.dumps(src))  # grain's workers get a pickled copy
    np.testing.assert_array_equal(again[7]["latent"], src[7]["latent"])


def test_official_shards_errors(tmp_path):
    safetensors.numpy.save_file({"latents": np.zeros((2, C, H, W), np.float32), "labels": np.zeros(2, np.int64)},
                                str(tmp_path / "latents_rank00_shard000.safetensors"))
    with pytest.raises(ValueError, match="no latents_flip"):
        latents_lib.OfficialLatentSource(str(tmp_path))


def test_normalized_batches_match_imglatentdataset(tmp_path):
    """The training pipeline's batches, normalized as the DiT step does, against ImgLatentDataset's
    (z - mean) / std * multiplier in NCHW with the release's 1 x C x 1 x 1 statistics."""
    z, z_flip, y = write_official_shards(str(tmp_path), COUNTS)
    rng = np.random.default_rng(1)
    mean, std = rng.normal(0.3, 0.05, C).astype(np.float32), rng.uniform(0.1, 0.3, C).astype(np.float32)
    write_release_stats(tmp_path / "latents_stats.pt", mean, std)
    m, s = latents_lib.latent_stats(str(tmp_path))
    multiplier = 0.7
    want = {}
    for i in range(len(z)):  # keyed by the raw bytes: the shuffled order is grain's business
        for a in (z, z_flip):
            ref = (a[i:i + 1].astype(np.float64) - mean.reshape(1, C, 1, 1)) / std.reshape(1, C, 1, 1) * multiplier
            want[a[i].tobytes()] = (ref[0].transpose(1, 2, 0), y[i])
    it = latents_lib.make_train_iterator(str(tmp_path), batch_size=4, seed=0, process_index=0, process_count=1)
    seen = 0
    for _ in range(3):  # one epoch of 12 records
        b = next(it)
        assert b["latent"].shape == (4, H, W, C) and b["label"].shape == (4,)
        for key in ("latent", "latent_flip"):
            x = np.asarray(jax.jit(latents_lib.normalize, static_argnums=3)(b[key], m, s, multiplier))
            for j in range(4):
                raw = b[key][j].transpose(2, 0, 1).astype(np.float32).tobytes()
                ref, label = want[raw]
                np.testing.assert_allclose(x[j], ref, rtol=1e-5, atol=1e-6)
                assert b["label"][j] == label
        seen += 4
    assert seen == 12


def test_latent_stats_computed_given_or_overridden(tmp_path):
    """Without latents_stats.pt an official folder gets ImgLatentDataset's statistics (mean and
    unbiased std over every position of the sampled unflipped latents: all of them here); an
    explicit stats path (dit.latent_stats) wins over the folder's."""
    z, _, _ = write_official_shards(str(tmp_path / "lat"), COUNTS)
    m, s = latents_lib.latent_stats(str(tmp_path / "lat"), n_samples=100)
    flat = z.astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, C)
    np.testing.assert_allclose(m, flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(s, flat.std(0, ddof=1), rtol=1e-6)
    assert not os.path.exists(tmp_path / "lat" / "latents_stats.pt")  # computed, not written
    given = write_release_stats(tmp_path / "given.pt", np.full(C, 2.0), np.full(C, 3.0))
    m, s = latents_lib.latent_stats(str(tmp_path / "lat"), given)
    assert np.all(m == 2.0) and np.all(s == 3.0)


# ------------------------------------------------------------------------------------------
# The DiT job and the extraction take them.
# ------------------------------------------------------------------------------------------
SIZE = 16  # tiny tokenizer: patch 8, latent_dim 8 -> 2 x 2 x 8 latents


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny.export_tokenizer(tmp_path_factory.mktemp("tokenizer"), SIZE, text=False)


def _dit_config(latents="", tokenizer=""):
    c = tiny.load_config("dit_demo")
    c.dit.update(size="tiny", patch_size=1)
    c.latents.tokenizer = tokenizer
    c.latents.data.update(image_size=SIZE, procedural_size=SIZE, batch_size=8, num_train_images=16)
    c.latents.part_batches = 2
    c.dit.latents, c.dit.tokenizer, c.dit.batch_size = latents, tokenizer, 4
    c.train.update(steps=2, mesh=(1, 1, 1))
    c.evals = {}
    return c


def test_dit_job_reads_official_shards_and_release_stats(tokenizer, tmp_path):
    from vtp_jax import sharding
    from vtp_jax.jobs import dit

    # the tiny tokenizer's latents (8 x 2 x 2), so samples decode
    _, _, y = write_official_shards(str(tmp_path / "lat"), COUNTS, classes=5, chw=(8, 2, 2))
    mean, std = np.linspace(-0.1, 0.1, 8), np.linspace(0.1, 0.3, 8)
    given = write_release_stats(tmp_path / "vtp_x.pt", mean, std)
    c = _dit_config(str(tmp_path / "lat"))
    assert any("set dit.tokenizer" in e for e in dit.validate(c, 1))
    c.dit.tokenizer = tokenizer
    c.dit.latent_stats = given
    assert dit.validate(c, 1) == []
    job = dit.make_job(c, sharding.make_mesh(c.train.mesh))
    assert job.model.input_size == 2 and job.model.in_channels == 8 and job.model.num_classes == int(y.max()) + 1
    np.testing.assert_array_equal(np.asarray(job.consts[0]), mean.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(job.consts[1]), std.astype(np.float32))
    b = next(job.data())
    assert b["latent"].shape == (4, 2, 2, 8) and b["label"].dtype == np.int32


def test_extraction_takes_the_release_stats(tokenizer, tmp_path):
    from vtp_jax import sharding
    from vtp_jax.jobs import extract_latents
    from vtp_jax.train import runner

    given = write_release_stats(tmp_path / "vtp.pt", np.arange(8.0), np.full(8, 0.5))
    c = _dit_config(tokenizer=tokenizer)
    c.latents.stats = given
    folder = extract_latents.extract(c, str(tmp_path / "lat"), sharding.make_mesh(c.train.mesh))
    m, s = latents_lib.load_stats(folder)
    np.testing.assert_array_equal(m, np.arange(8.0, dtype=np.float32))
    np.testing.assert_array_equal(s, np.full(8, 0.5, np.float32))
    assert latents_lib.read_meta(folder)["stats"] == given
    c.latents.stats = write_release_stats(tmp_path / "wrong.pt", np.zeros(3), np.ones(3))
    with pytest.raises(runner.ConfigError, match="3 channels"):
        extract_latents.extract(c, str(tmp_path / "lat2"), sharding.make_mesh(c.train.mesh))


def test_flow_loss_evaluator_reads_official_shards(tmp_path):
    """Held-out latents in the official layout: records NHWC in file order, normalized with the
    generator's statistics; the loss is the DiT's flow loss on them."""
    import types

    from vtp_jax.evals import evaluator, generation
    from vtp_jax.models import dit
    from vtp_jax import sharding

    z, _, y = write_official_shards(str(tmp_path), {(0, 0): 3, (0, 1): 2})
    model = dit.LightningDiT(input_size=H, patch_size=2, in_channels=C, hidden_size=32, depth=1, num_heads=2,
                             num_classes=10)
    params = dit.init_params(model, jax.random.key(0))
    gen = types.SimpleNamespace(model=model, mean=np.full(C, 0.3, np.float32), std=np.full(C, 0.2, np.float32),
                                multiplier=1.0)
    e = evaluator.resolved(ml_collections.ConfigDict(dict(type="flow_loss", latents=str(tmp_path), batch_size=4)))
    ev = generation.FlowLossEvaluator(gen, sharding.make_mesh((1, 1, 1)), e)
    np.testing.assert_array_equal(ev.z, z.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(ev.y, y)
    # Zero-initialized output (adaLN-Zero): v = 0 for any input, so each record's loss is
    # mean (x1 - x0)^2 + mean over positions of (1 - cos(0, u)) = mean (x1 - x0)^2 + 1, with x1 the
    # normalized latent and x0 the evaluator's fixed noise (batch b: split(fold_in(key(seed), b * 4))[0]).
    assert not np.any(model.apply({"params": params}, jax.numpy.zeros((2, H, W, C)), jax.numpy.ones(2),
                                  jax.numpy.zeros(2, int)))
    want = []
    for start in range(0, len(z), 4):
        x1 = (z[start:start + 4].transpose(0, 2, 3, 1).astype(np.float64) - 0.3) / 0.2
        r_noise, _ = jax.random.split(jax.random.fold_in(jax.random.key(0), start))
        x0 = np.asarray(jax.random.normal(r_noise, x1.shape), np.float64)
        want += list(np.mean((x1 - x0) ** 2, axis=(1, 2, 3)) + 1.0)
    loss = ev.run(params)["loss"]
    np.testing.assert_allclose(loss, np.mean(want), rtol=1e-5)
