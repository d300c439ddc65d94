"""The DiT job: latent extraction (records, flips, statistics) on the procedural set with a tiny
tokenizer, training and sampling through the shared runner, and the XL recipe compiling on 8 fake
devices."""
import json
import os
import tempfile

import flax
import jax
import numpy as np
import pytest

import tiny
from vtp_jax import jobs, sharding
from vtp_jax.data import latents as latents_lib
from vtp_jax.jobs import extract_latents
from vtp_jax.train import runner

SIZE = 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny.export_tokenizer(tmp_path_factory.mktemp("tokenizer"), SIZE, text=False)


def extract(c, folder):
    """The extract_latents job's work for a dit config's `latents` section."""
    return extract_latents.extract(c, folder, sharding.make_mesh(c.train.mesh))


def dit_config(tokenizer, steps=4):
    c = tiny.dit_config(tokenizer, SIZE, steps=steps)
    c.dit.sample.update(num_steps=3, every=2, classes=2, per_class=2)
    return c


def test_extraction_records_flips_and_stats(tokenizer, tmp_path):
    import vtp_jax
    from vtp_jax.data import procedural

    c = dit_config(tokenizer)
    c.train.mesh = (2, 1, 1)  # batches split over devices
    folder = extract(c, str(tmp_path))
    meta = latents_lib.read_meta(folder)
    assert meta["shape"] == [2, 2, 8] and meta["num_classes"] == 64 and meta["records"] == 44
    import grain

    source = grain.sources.ArrayRecordDataSource(latents_lib.shard_paths(folder))
    records = [latents_lib.decode_record(source[i], meta["shape"], meta["dtype"]) for i in range(len(source))]
    # Independently: render the same procedural images and encode them with the released-model API.
    pre = vtp_jax.load_pretrained(tokenizer)
    images, labels = [], []
    for i in range(44):
        ex = procedural.render_example(0, i, SIZE, c.latents.data.procedural_objects,  # the train split's seed
                                       c.latents.data.procedural_sizes)
        images.append((ex["image"] / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225])
        labels.append(ex["label"])
    images = np.asarray(images, np.float32)
    z, z_flip = np.asarray(pre.encode(images)), np.asarray(pre.encode(images[:, :, ::-1]))
    got = {int(np.argmin(np.abs(z - r["latent"]).sum(axis=(1, 2, 3)))): r for r in records}
    assert sorted(got) == list(range(44))  # every image exactly once
    for i, r in got.items():
        np.testing.assert_allclose(r["latent"], z[i], atol=2e-3, rtol=2e-3)  # float16 storage
        np.testing.assert_allclose(r["latent_flip"], z_flip[i], atol=2e-3, rtol=2e-3)
        assert r["label"] == labels[i]
    mean, std = latents_lib.load_stats(folder)
    sample = np.stack([r["latent"] for r in records]).reshape(-1, 8)  # 30 of 44 were sampled: loose
    np.testing.assert_allclose(mean, sample.mean(0), atol=3 * sample.std(0).max() / np.sqrt(30 * 4))
    assert np.all(std > 0.5 * sample.std(0)) and np.all(std < 2 * sample.std(0))
    # a rerun finds the extraction complete and leaves it alone
    before = {p: os.path.getmtime(p) for p in latents_lib.shard_paths(folder)}
    extract(c, str(tmp_path))
    assert before == {p: os.path.getmtime(p) for p in latents_lib.shard_paths(folder)}


def test_extraction_resumes_after_a_lost_part(tokenizer, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"  # where the job's local staging folder goes
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    c = dit_config(tokenizer)
    folder = extract(c, str(tmp_path / "a"))
    paths = latents_lib.shard_paths(folder)
    os.remove(paths[1])
    os.remove(os.path.join(folder, "meta.json"))
    extract(c, folder)
    assert latents_lib.shard_paths(folder) == paths and latents_lib.read_meta(folder)["records"] == 44
    extract(c, folder)  # complete: returns at once
    assert os.listdir(scratch) == []  # every run removed its staging folder


def test_dit_job_trains_samples_and_resumes(tokenizer, tmp_path):
    c = dit_config(tokenizer, steps=4)
    out = jobs.run(c, str(tmp_path))
    assert np.isfinite(out["loss"])
    assert sorted(os.listdir(tmp_path / "samples")) == ["0000002.png", "0000004.png"]
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "samples" / "0000004.png"))
    assert grid.shape == (2 * SIZE, 2 * SIZE, 3)
    assert json.load(open(tmp_path / "latents" / "meta.json"))["records"] == 44
    ema = tiny.restore_params(tmp_path, 4, field="ema_params")
    params = tiny.restore_params(tmp_path, 4, field="params")
    differs = jax.tree.map(lambda a, b: not np.array_equal(a, b), ema, params)
    assert any(jax.tree.leaves(differs))  # the EMA is its own pytree, behind the params


def test_sample_grid_label_outside_the_classes_is_one_error_before_training(tokenizer, tmp_path):
    c = dit_config(tokenizer)
    c.dit.sample.labels = (3, 64)  # the procedural latents have 64 classes: 0 .. 63
    with pytest.raises(runner.ConfigError, match=r"dit.sample.labels \[64\]: class ids must lie in \[0, 64\)"):
        jobs.run(c, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_a_batch_one_per_chip_validates_on_a_64_chip_16_host_slice():
    """A v6e-64 has 64 batch shards over 16 processes: a global batch of 64 is one image per chip
    and four per host, which extraction takes (the shards span the processes; it once asked for a
    multiple of 64 x 16). 48 is not a multiple of the 64 shards: one line names it."""
    c = tiny.load_config("dit_xl_vtp_l")
    c.latents.tokenizer = "MiniMaxAI/VTP-Large-f16d64"
    c.latents.data.update(source="tfds", tfds_name="imagenet2012", image_size=256)
    assert c.latents.data.batch_size == 64 and not c.dit.latents
    jobs.validate(c, n_batch_shards=64, n_processes=16)
    c.latents.data.batch_size = 48
    with pytest.raises(runner.ConfigError) as e:
        jobs.validate(c, n_batch_shards=64, n_processes=16)
    assert str(e.value).splitlines()[1:] == [
        "  latents.data.batch_size=48 is not divisible by the 64 batch shards and 16 processes"]


def test_dit_xl_recipe_compiles_on_8_devices(tmp_path):
    """The release's XL/1 recipe (28 x 1152, scanned blocks) compiles on 8 fake CPU devices at a
    small batch with the step sharded by the logical axis names (compile only)."""
    from vtp_jax.jobs import dit
    from vtp_jax.models import dit as dit_lib
    from vtp_jax.train import optim

    c = tiny.load_config("dit_xl_vtp_l")
    c.dit.batch_size, c.train.mesh = 8, (2, 4, 1)
    meta = {"shape": [16, 16, 64], "num_classes": 1000}
    model = dit.model_from(c, meta)
    assert (model.depth, model.hidden_size, model.num_heads) == dit_lib.DIT_SIZES["XL"] and model.scan_layers
    mesh = sharding.make_mesh(c.train.mesh)
    params = jax.eval_shape(lambda: dit_lib.init_params(model, jax.random.key(0)))
    tx = optim.make_optimizer(c.optim, params, c.train.steps, depth=0)
    boxed = jax.eval_shape(lambda: dit.init_state(model, tx, jax.random.key(0)))
    shardings = sharding.logical_shardings(boxed, mesh)
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  jax.eval_shape(lambda: flax.linen.meta.unbox(dit.init_state(model, tx, jax.random.key(0)))),
                                  shardings)
    batch = {k: jax.ShapeDtypeStruct(s, dt, sharding=sharding.batch_sharding(mesh, len(s))) for k, s, dt in
             (("latent", (8, 16, 16, 64), np.float32), ("latent_flip", (8, 16, 16, 64), np.float32),
              ("label", (8,), np.int32))}
    consts = (jax.ShapeDtypeStruct((64,), np.float32), jax.ShapeDtypeStruct((64,), np.float32))
    with runner.scope_of(mesh):
        step = jax.jit(dit.make_train_step(c, model, tx), in_shardings=(shardings, None, None),
                       out_shardings=(shardings, None), donate_argnums=0)
        step.lower(abstract_state, batch, consts).compile()
        flops = runner.model_flops(step, abstract_state, batch, consts)
    sizes = {jax.tree_util.keystr(k): np.prod(x.shape) for k, x in jax.tree_util.tree_leaves_with_path(abstract_state.params)}
    assert 6.5e8 < sum(sizes.values()) < 7e8  # ~675M at C = 64 (downstream.md)
    # MFU's numerator, every scanned block counted, in closed form: 6 FLOPs (forward + backward)
    # per matmul weight per token for the token-wise kernels, per sample for the conditioning
    # ones (adaLN, timestep MLP), and 12 T^2 D per block and sample for attention.
    kernels = {k: v for k, v in sizes.items() if k.endswith("'kernel']")}
    per_sample = sum(v for k, v in kernels.items() if "adaLN" in k or "t_embedder" in k)
    per_token = sum(kernels.values()) - per_sample
    b, t, (depth, width, _) = 8, 16 * 16, dit_lib.DIT_SIZES["XL"]
    want = 6 * b * (t * per_token + per_sample) + 12 * depth * t * t * width * b
    assert abs(flops / want - 1) < 0.01, (flops, want)
