"""The evaluators and the standalone evaluation job on tiny tokenizers (procedural data).

Values are checked against independent computations (the released-model API and NumPy formulas),
and the sharded evaluators against one device."""
import json
import os

import jax
import numpy as np
import pytest

import tiny
from vtp_jax import jobs, sharding
from vtp_jax.checkpoints import tokenizers
from vtp_jax.train import runner

SIZE = 16  # the tiny config's images: 2 x 2 patches of 8 px


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny tokenizer (trunk, decoder, text tower) as a release-format folder."""
    from vtp_jax.checkpoints import released
    from vtp_jax.models import vtp

    c = tiny.get_config().model
    c.head.prototypes = 0
    params = jax.device_get(jax.jit(lambda r: vtp.init_params(c, r, SIZE))(jax.random.key(0)))
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    released.export_release(c, params, folder, image_size=SIZE)
    return folder


def eval_config(checkpoint, mesh=(1, 1, 1)):
    c = tiny.load_config("eval_demo")
    c.eval.checkpoint = checkpoint
    c.train.mesh = mesh
    for e in c.evals.values():
        e.data.update(image_size=SIZE, procedural_size=SIZE, batch_size=8, num_images=20, num_train_images=40)
    c.evals.linear_probe.epochs = 3
    return c


def test_eval_job_writes_flat_metrics(tokenizer, tmp_path, caplog):
    import vtp_jax
    from vtp_jax.data import eval_splits, pipeline
    from vtp_jax.evals import evaluator

    metrics = jobs.run(eval_config(tokenizer), str(tmp_path))
    saved = json.load(open(tmp_path / "metrics.json"))
    for key in ("psnr", "ssim", "zero_shot/top1", "zero_shot/top5", "linear_probe/top1", "knn/top1"):
        assert key in saved and np.isfinite(saved[key]), key
    assert "lpips" not in saved and "rfid" not in saved  # no weight files given: said, and skipped
    assert any("no LPIPS weights" in r.message for r in caplog.records)
    assert any("no Inception weights" in r.message for r in caplog.records)
    for key in ("zero_shot/top1", "linear_probe/top1", "knn/top1", "ssim"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved == pytest.approx({k: metrics[k] for k in saved})
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))

    # PSNR and SSIM recomputed independently: the released-model API and NumPy on the same images.
    from scipy.ndimage import correlate1d

    pre = vtp_jax.load_pretrained(tokenizer)
    d = evaluator.resolved(eval_config(tokenizer).evals.reconstruction).data
    batch = next(pipeline.make_eval_iterator(eval_splits.make_source(d), image_size=SIZE, batch_size=20))
    x = batch["images"]
    denorm = lambda v: np.asarray(v, np.float64) * [0.229, 0.224, 0.225] + [0.485, 0.456, 0.406]  # noqa: E731
    real, recon = denorm(x), np.clip(denorm(pre.decode(pre.encode(x))), 0, 1)
    mse = ((255 * real - 255 * recon) ** 2).mean(axis=(1, 2, 3))
    assert saved["psnr"] == pytest.approx(np.mean(10 * np.log10(255 ** 2 / mse)), rel=1e-4)
    g = np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)
    g /= g.sum()

    def blur(v):  # torchmetrics: reflect padding (edge not repeated), separable gaussian
        return correlate1d(correlate1d(v, g, axis=1, mode="mirror"), g, axis=2, mode="mirror")

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_x, mu_y = blur(real), blur(recon)
    sxx, syy, sxy = blur(real * real) - mu_x ** 2, blur(recon * recon) - mu_y ** 2, blur(real * recon) - mu_x * mu_y
    ssim_map = (2 * mu_x * mu_y + c1) * (2 * sxy + c2) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    assert saved["ssim"] == pytest.approx(ssim_map.mean(axis=(1, 2, 3)).mean(), rel=1e-4)


def test_evaluators_on_8_devices_equal_one_device(tokenizer):
    from vtp_jax.evals import evaluator

    model_cfg, params = tokenizers.load_tokenizer(tokenizer)
    from vtp_jax.models.vtp import VTP

    results = []
    for mesh_shape in ((1, 1, 1), (8, 1, 1)):
        c = eval_config(tokenizer, mesh_shape)
        c.evals = {k: c.evals[k] for k in ("reconstruction", "knn", "zero_shot")}
        mesh = sharding.make_mesh(mesh_shape)
        with runner.scope_of(mesh):
            evs = evaluator.build(c, VTP(model_cfg), mesh)
            placed = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
            results.append({k: v for name, ev in evs.items() for k, v in ev.run(placed).items()})
    assert results[0].keys() == results[1].keys()
    for k in results[0]:
        assert results[1][k] == pytest.approx(results[0][k], rel=1e-5, abs=1e-6), k


def test_reconstruction_evaluator_with_lpips_and_inception_weights(tokenizer, tmp_path, monkeypatch):
    """With (random) LPIPS and Inception weight files, lpips and rfid are reported (their values
    are checked against references in test_fid.py and test_lpips.py; this checks the wiring, so
    the Frechet distance of the Inception features is a cheap stand-in)."""
    import flax.linen as nn
    from flax import serialization

    from test_fid import frechet_stand_in
    from vtp_jax.evals import evaluator, fid
    from vtp_jax.models import inception, lpips
    from vtp_jax.models.vtp import VTP

    x = np.zeros((1, 64, 64, 3), np.float32)
    lp = nn.meta.unbox(jax.jit(lpips.LPIPS().init)(jax.random.key(1), x, x)["params"])
    inc = nn.meta.unbox(jax.jit(lambda r: inception.FIDInceptionV3().init(r, np.zeros((1, 299, 299, 3), np.float32),
                                                                           method="logits"))(jax.random.key(2))["params"])
    for name, p in (("lpips", lp), ("inception", inc)):
        (tmp_path / f"{name}.msgpack").write_bytes(serialization.msgpack_serialize(jax.device_get(p)))
    c = eval_config(tokenizer)
    c.evals = {"reconstruction": c.evals.reconstruction}
    c.evals.reconstruction.update(lpips_params=str(tmp_path / "lpips.msgpack"),
                                  inception_params=str(tmp_path / "inception.msgpack"))
    model_cfg, params = tokenizers.load_tokenizer(tokenizer)
    mesh = sharding.make_mesh((1, 1, 1))
    distances = []
    monkeypatch.setattr(fid, "frechet_distance", lambda *a: distances.append(a) or frechet_stand_in(*a))
    with runner.scope_of(mesh):
        (ev,) = evaluator.build(c, VTP(model_cfg), mesh).values()
        out = ev.run(jax.device_put(params))
    assert np.isfinite(out["lpips"]) and out["lpips"] != 0  # random lin heads: any sign
    (mu1, sigma1, mu2, sigma2), = distances  # rFID of the Inception pool features: 2048-d
    assert mu1.shape == mu2.shape == (2048,) and sigma1.shape == sigma2.shape == (2048, 2048)
    assert out["rfid"] == frechet_stand_in(mu1, sigma1, mu2, sigma2)
    assert {"psnr", "ssim", "lpips", "rfid"} <= set(out)


def test_eval_job_bad_checkpoint_is_one_clear_error(tmp_path, tokenizer):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tokenizer, broken)
    os.remove(broken / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"broken/model.safetensors not found"):
        jobs.run(eval_config(str(broken)), str(tmp_path / "w"))
    with pytest.raises(runner.ConfigError, match="eval.checkpoint is empty"):
        jobs.run(eval_config(""), str(tmp_path / "w"))
