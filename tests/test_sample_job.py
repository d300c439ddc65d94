"""The sample job on a tiny DiT workdir (trained here for 2 steps): samples.npz in the layout ADM's
evaluator reads, class-balanced labels, a resumed run byte-identical to an uninterrupted one,
images equal to the sampler re-derived in NumPy on the same noise, and the same samples from the DiT
written as an official LightningDiT checkpoint (torch.save's layout, written without torch; it needs
a tokenizer and latent statistics) and its state dict read alike from .pt, .safetensors and .npz."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

import tiny
import torch_files
import vtp_jax
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


IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def test_images_are_the_sampler_rederived_in_numpy(trained, tmp_path):
    """Independently of the job's Generator, sampler and quantisation. The trained DiT's params,
    perturbed so that its velocity is far from 0 (2 steps from adaLN-Zero leave it near 0, where
    any sampler gives the same images), written as an official state dict; the job samples them
    with guidance 2, 3 grid points, shift 0.3 and multiplier 0.8. The reference in NumPy float64:
    LightningDiT's grid (linspace, then t' = s t / (1 + (s - 1) t)), the Euler steps, CFG
    v_u + s (v_c - v_u) with the null class, the inverse latent normalisation with stats.npz,
    ImageNet's inverse normalisation, the clip and ADM's floor(255 x). Only the networks (the DiT's
    velocity in our layout, not through the state dict; the tokenizer's decoder through the public
    load_pretrained) and the per-sample noise N(0, I) of fold_in(key(seed), i) come from the package."""
    tokenizer, workdir = trained
    c = dit.default_config()
    c.dit.update(json.load(open(os.path.join(workdir, "config.json")))["dit"])
    meta = json.load(open(os.path.join(c.dit.latents, "meta.json")))
    model, channels = dit.model_from(c, meta), meta["shape"][-1]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32),
                          tiny.restore_params(workdir, 2, "ema_params"))
    sd = ld.to_state_dict({f: getattr(model, f) for f in HP_FIELDS}, params)
    safetensors.numpy.save_file(sd, str(tmp_path / "dit.safetensors"))
    scale, steps, shift, multiplier = 2.0, 3, 0.3, 0.8
    stats = os.path.join(c.dit.latents, "stats.npz")
    out = str(tmp_path / "samples")
    jobs.run(sample_config(str(tmp_path / "dit.safetensors"), tokenizer=tokenizer, latent_stats=stats,
                           num_steps=steps, shift=shift, cfg_scale=scale, latent_multiplier=multiplier,
                           num_samples=CLASSES, part_size=CLASSES, preview=0), out)
    images, labels = load_npz(out)
    with np.load(stats) as f:
        mean, std = f["mean"].astype(np.float64), f["std"].astype(np.float64)
    noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(0), i), tuple(meta["shape"])))
                      for i in range(len(labels))]).astype(np.float64)
    x = noise
    t = np.linspace(0.0, 1.0, steps)
    t = shift * t / (1 + (shift - 1) * t)

    def velocity(x, t, y):
        out = model.apply({"params": params}, jnp.asarray(x, jnp.float32), jnp.full((len(x),), t, jnp.float32),
                          jnp.asarray(y))
        return np.asarray(out, np.float64)[..., :channels]

    with runner.scope_of(sharding.make_mesh((1, 1, 1))):
        for t0, t1 in zip(t[:-1], t[1:]):
            v_c, v_u = velocity(x, t0, labels), velocity(x, t0, np.full_like(labels, model.num_classes))
            x = x + (t1 - t0) * (v_u + scale * (v_c - v_u))
    z = x / multiplier * std + mean
    pixels = np.asarray(vtp_jax.load_pretrained(tokenizer).decode(z), np.float64) * IMAGENET_STD + IMAGENET_MEAN
    want = np.floor(255 * np.clip(pixels, 0.0, 1.0)).astype(np.uint8)
    # float32 networks fed float64 sums on one device, the job's on two: a level of 255 at most, rarely
    diff = np.abs(want.astype(int) - images)
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.999, (diff.max(), np.mean(diff == 0))
    assert np.abs(x - noise).mean() > 0.1  # the sampler moves the noise far: a wrong grid or guidance shows
    # the job's batched noise is the per-sample noise, whatever the batch
    idx = np.arange(32, 64)
    np.testing.assert_array_equal(sample.sample_noise(0, idx, meta["shape"]), noise[idx].astype(np.float32))
    np.testing.assert_array_equal(sample.sample_noise(0, idx[5:9], meta["shape"]), noise[idx[5:9]].astype(np.float32))


def test_official_checkpoint_needs_tokenizer_and_stats_then_matches(trained, sampled, tmp_path):
    tokenizer, workdir = trained
    c = dit.default_config()
    c.dit.update(json.load(open(os.path.join(workdir, "config.json")))["dit"])
    model = dit.model_from(c, latents_lib.read_meta(c.dit.latents))
    sd = ld.to_state_dict({f: getattr(model, f) for f in HP_FIELDS}, tiny.restore_params(workdir, 2, "ema_params"))
    # torch.save({"ema": state dict}) in torch's zip layout, written without torch (tests/torch_files.py)
    path = str(tmp_path / "lightningdit.pt")
    torch_files.save({"ema": {k: torch_files.tensor(v) for k, v in sd.items()}, "steps": 2}, path,
                     archive="lightningdit")
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
    # the .pt, .safetensors and .npz forms of the same state dict read to the same arrays
    safetensors.numpy.save_file(sd, str(tmp_path / "sd.safetensors"))
    np.savez(tmp_path / "sd.npz", **sd)
    for form in (path, str(tmp_path / "sd.safetensors"), str(tmp_path / "sd.npz")):
        back = sample.read_official_state_dict(form)
        assert sorted(back) == sorted(sd), form
        for k in sd:
            assert back[k].dtype == np.float32 and np.array_equal(back[k], sd[k]), (form, k)


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
