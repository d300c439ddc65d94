"""The sample job on a tiny DiT workdir (trained here for 2 steps): samples.npz in the layout ADM's
evaluator reads, class-balanced labels, a resumed run byte-identical to an uninterrupted one,
images equal to the DiT job's Generator on the same noise, and the same samples from the DiT
written as an official LightningDiT checkpoint (which needs a tokenizer and latent statistics)."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import tiny
from vtp_jax import jobs, sharding
from vtp_jax.checkpoints import lightningdit as ld
from vtp_jax.data import latents as latents_lib
from vtp_jax.jobs import dit, sample
from vtp_jax.train import runner

SIZE, N, CLASSES = 16, 128, 64  # 16 px images from 2 x 2 x 8 latents; the procedural set's 64 classes
HP_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
             "num_classes", "qk_norm", "use_rope", "learn_sigma")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(tokenizer folder, dit workdir): a tiny DiT trained 2 steps on the tiny tokenizer's latents."""
    tokenizer = tiny.export_tokenizer(tmp_path_factory.mktemp("tokenizer"), SIZE, text=False)
    c = tiny.dit_config(tokenizer, SIZE, num_train_images=16, stats_samples=16, steps=2)
    c.dit.sample.update(num_steps=3, every=0)  # shift 0.3 (dit_demo); no grids during training
    workdir = str(tmp_path_factory.mktemp("dit"))
    jobs.run(c, workdir)
    return tokenizer, workdir


def sample_config(checkpoint, **kw):
    c = tiny.load_config("sample")
    c.sample.update({**dict(checkpoint=checkpoint, num_samples=N, batch_size=32, part_size=64, preview=4), **kw})
    c.train.mesh = (2, 1, 1)  # every batch split over 2 devices
    return c


@pytest.fixture(scope="module")
def sampled(trained, tmp_path_factory):
    """The sample job's workdir for the trained DiT (per-class labels, 2 parts of 2 batches)."""
    workdir = str(tmp_path_factory.mktemp("samples"))
    out = jobs.run(sample_config(trained[1]), workdir)
    assert out["num_samples"] == N and out["samples_per_second"] > 0
    return workdir


def load_npz(workdir):
    with np.load(os.path.join(workdir, "samples.npz")) as f:
        return f["arr_0"], f["arr_1"]


def test_samples_npz_labels_and_preview(sampled):
    images, labels = load_npz(sampled)
    assert images.dtype == np.uint8 and images.shape == (N, SIZE, SIZE, 3)
    assert 10 < images.std() and images.min() < images.max()  # pictures, not a constant
    np.testing.assert_array_equal(labels, np.repeat(np.arange(CLASSES), N // CLASSES))  # each class N / C times
    assert sorted(os.listdir(os.path.join(sampled, "parts"))) == ["part-00000.npz", "part-00001.npz", "settings.json"]
    with np.load(os.path.join(sampled, "parts", "part-00001.npz")) as part:
        np.testing.assert_array_equal(part["images"], images[64:])
        np.testing.assert_array_equal(part["labels"], labels[64:])
    preview = np.asarray(Image.open(os.path.join(sampled, "samples.png")))
    assert preview.shape == (4 * SIZE, 2 * SIZE, 3)  # 4 classes (rows) x their 2 samples
    np.testing.assert_array_equal(preview[:SIZE, SIZE:], images[1])  # row 0: class 0, samples 0 and 1
    np.testing.assert_array_equal(preview[-SIZE:, :SIZE], images[N - 2])  # last row: class 63
    settings = json.load(open(os.path.join(sampled, "parts", "settings.json")))
    assert settings["num_steps"] == 3 and settings["shift"] == 0.3 and settings["step"] == 2  # the DiT's own


def test_resumed_run_is_byte_identical(sampled, tmp_path):
    images, labels = load_npz(sampled)
    workdir = str(tmp_path / "w")
    shutil.copytree(sampled, workdir)
    first = os.path.join(workdir, "parts", "part-00000.npz")
    os.utime(first, (0, 0))
    os.remove(os.path.join(workdir, "parts", "part-00001.npz"))  # killed during the last part
    os.remove(os.path.join(workdir, "samples.npz"))
    jobs.run(sample_config(json.load(open(os.path.join(workdir, "parts", "settings.json")))["checkpoint"]), workdir)
    assert os.path.getmtime(first) == 0  # a finished part is skipped
    again, labels_again = load_npz(workdir)
    assert again.tobytes() == images.tobytes() and np.array_equal(labels_again, labels)
    # a rerun of a finished workdir leaves it alone
    os.utime(os.path.join(workdir, "samples.npz"), (0, 0))
    jobs.run(sample_config(json.load(open(os.path.join(workdir, "parts", "settings.json")))["checkpoint"]), workdir)
    assert os.path.getmtime(os.path.join(workdir, "samples.npz")) == 0
    # a rerun with other settings refuses to mix its samples with these
    with pytest.raises(runner.ConfigError, match=r"other settings \(cfg_scale: 1.0 -> 2.0\)"):
        jobs.run(sample_config(json.load(open(os.path.join(workdir, "parts", "settings.json")))["checkpoint"],
                 cfg_scale=2.0), workdir)


def test_images_are_the_dit_generators_on_the_same_noise(trained, sampled):
    """Independently of the job: the DiT job's Generator on the run's config, the EMA params of its
    checkpoint and noise drawn one sample at a time from fold_in(key(seed), i)."""
    images, labels = load_npz(sampled)
    workdir = trained[1]
    c = dit.default_config()
    c.dit.update(json.load(open(os.path.join(workdir, "config.json")))["dit"])
    meta = latents_lib.read_meta(c.dit.latents)
    mesh = sharding.make_mesh((1, 1, 1))
    mean, std, tok_model, tok_params = dit.load_generator_parts(c, meta, mesh)
    g = dit.Generator(dit.model_from(c, meta), c.dit.sample, mean, std, c.dit.latent_multiplier, tok_model,
                      tok_params, latent_shape=meta["shape"])
    ema = tiny.restore_params(workdir, 2, field="ema_params")
    idx = np.arange(32, 64)  # the second batch
    noise = np.stack([jax.random.normal(jax.random.fold_in(jax.random.key(0), int(i)), tuple(meta["shape"]))
                      for i in idx])
    with runner.scope_of(mesh):
        x = np.asarray(g.images(ema, noise, labels[idx]))
    want = np.floor(255 * x).astype(np.uint8)
    # another mesh (1 device, not 2) may round a float differently: a level of 255 at most, rarely
    diff = np.abs(want.astype(int) - images[idx])
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.999, (diff.max(), np.mean(diff == 0))
    # the job's batched noise is the per-sample noise, whatever the batch
    np.testing.assert_array_equal(sample.sample_noise(0, idx, meta["shape"]), noise)
    np.testing.assert_array_equal(sample.sample_noise(0, idx[5:9], meta["shape"]), noise[5:9])


def test_official_checkpoint_needs_tokenizer_and_stats_then_matches(trained, sampled, tmp_path):
    tokenizer, workdir = trained
    c = dit.default_config()
    c.dit.update(json.load(open(os.path.join(workdir, "config.json")))["dit"])
    model = dit.model_from(c, latents_lib.read_meta(c.dit.latents))
    sd = ld.to_state_dict({f: getattr(model, f) for f in HP_FIELDS}, tiny.restore_params(workdir, 2, "ema_params"))
    try:
        import torch

        path = str(tmp_path / "lightningdit.pt")
        torch.save({"ema": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
    except ImportError:
        path = str(tmp_path / "lightningdit.npz")
        np.savez(path, **sd)
    with pytest.raises(runner.ConfigError) as e:
        jobs.run(sample_config(path), str(tmp_path / "refused"))
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 2 and lines[0].strip().startswith("sample.tokenizer is empty") and \
        lines[1].strip().startswith("sample.latent_stats is empty"), str(e.value)
    assert not os.path.exists(tmp_path / "refused" / "samples.npz")
    # with them (and the trained DiT's sampler: an official checkpoint has none), the same samples
    out = str(tmp_path / "official")
    jobs.run(sample_config(path, tokenizer=tokenizer, latent_stats=os.path.join(c.dit.latents, "stats.npz"),
                           num_steps=3, shift=0.3), out)
    images, labels = load_npz(out)
    want, want_labels = load_npz(sampled)
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(images, want)  # the same params, noise, statistics and decoder
    # the .safetensors / .npz forms of the same state dict load to the same params
    np.savez(tmp_path / "sd.npz", **sd)
    back = sample.read_official_state_dict(str(tmp_path / "sd.npz"))
    assert sorted(back) == sorted(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)


def test_validation_one_line_per_problem(trained, tmp_path):
    c = sample_config(str(tmp_path / "nowhere"), num_samples=0, batch_size=3, labels="balanced", method="rk4")
    errs = sample.validate(c, 2, 1)
    for want in ("sample.checkpoint=", "sample.num_samples=0", "sample.batch_size=3", "sample.labels='balanced'",
                 "sample.method='rk4'"):
        assert sum(e.startswith(want) for e in errs) == 1, (want, errs)
    assert sample.validate(sample_config(""), 2, 1)[0].startswith("sample.checkpoint is empty")
    errs = sample.validate(sample_config(trained[1], batch_size=32, part_size=48), 2, 1)
    assert errs == ["sample.part_size=48 is not a positive multiple of sample.batch_size=32"]
    assert sample.validate(sample_config(trained[1]), 2, 1) == []
    errs = sample.validate(sample_config(trained[0]), 2, 1)  # a folder, but no dit workdir
    assert len(errs) == 1 and "not a dit workdir" in errs[0]
    # per-class labels need a multiple of the class count; uniform ones are seeded and in range
    with pytest.raises(runner.ConfigError, match="sample.num_samples=100 is not a multiple of the DiT's 64 classes"):
        sample.class_labels("per_class", 100, 64, 0)
    u = sample.class_labels("uniform", 1000, 64, 3)
    assert np.array_equal(u, sample.class_labels("uniform", 1000, 64, 3)) and u.min() >= 0 and u.max() < 64
    assert len(np.unique(u)) == 64
