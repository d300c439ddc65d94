"""Stage 2 (decoder GAN fine-tuning) on a tiny tokenizer: the encoder stays bit-identical, the
adaptive weight is the taming ratio computed here by separate gradients, and a run resumes."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from vtp_jax import images, jobs, objectives, sharding
from vtp_jax.models.discriminator import PatchDiscriminator
from vtp_jax.models.vtp import VTP
from vtp_jax.train import runner

SIZE = 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny.export_tokenizer(tmp_path_factory.mktemp("tokenizer"), SIZE, text=True)


def stage2_config(tokenizer, steps=4, **stage2):
    c = tiny.load_config("demo_stage2")
    c.train.init_from = tokenizer
    c.train.update(steps=steps, checkpoint_every=2, images_every=2, log_every=1, mesh=(1, 1, 1))
    c.data.update(image_size=SIZE, procedural_size=SIZE, batch_clip=8, batch_rec=8)
    c.stage2.update(dict(dict(disc_ndf=32, disc_layers=1, disc_start=1), **stage2))
    c.optim.warmup_steps = 0
    c.evals.reconstruction.data.update(image_size=SIZE, procedural_size=SIZE, batch_size=8, num_images=8)
    return c


def test_stage2_trains_only_the_decoder_and_exports(tokenizer, tmp_path):
    import vtp_jax

    jobs.run(stage2_config(tokenizer), str(tmp_path))
    before, after = vtp_jax.load_pretrained(tokenizer), vtp_jax.load_pretrained(str(tmp_path / "export"))
    for part in ("trunk", "feature_bottleneck", "text", "visual_proj"):
        jax.tree.map(np.testing.assert_array_equal, after.params[part], before.params[part])
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), after.params["pixel_decoder"],
                           before.params["pixel_decoder"])
    assert all(jax.tree.leaves(changed))
    x = np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_array_equal(after.encode(x), before.encode(x))  # the latents are bit-identical
    assert sorted(os.listdir(tmp_path / "reconstructions")) == ["0000002.png", "0000004.png"]
    for name in ("metrics_start.json", "metrics.json"):
        assert {"psnr", "ssim"} <= set(json.load(open(tmp_path / name)))
    # the optimizer states hold the decoder and the discriminator only
    state = tiny.restore_params(tmp_path, 4, field="opt_state")
    assert "trunk" not in json.dumps(jax.tree_util.tree_structure(state).__repr__())


def test_adaptive_weight_and_step_match_separate_gradients(tokenizer):
    """The step's lambda = ||dL_rec/dW|| / (||dL_G/dW|| + 1e-4) (W the last decoder layer), and its
    decoder update is that of L_rec + lambda * disc_weight * L_G, each gradient taken here apart."""
    c = stage2_config(tokenizer, disc_start=0)
    c.optim.update(clip_grad=0.0)
    tr = jobs.build(c, sharding.make_mesh((1, 1, 1)))
    model, s = tr.model, tr.config.stage2
    disc = PatchDiscriminator(s.disc_ndf, s.disc_layers, s.disc_norm)
    batch = {"rec_images": np.random.default_rng(1).standard_normal((8, SIZE, SIZE, 3)).astype(np.float32)}
    with runner.scope(tr):
        state = tr.job.start(tr.init(jax.random.key(0)))
        frozen, _ = tr.consts
        before = jax.device_get(state)  # the step donates its input
        state1, m = tr.step(state, sharding.global_batch(batch, tr.mesh), tr.consts)
    state = before
    x = batch["rec_images"]
    z = model.apply({"params": frozen}, x, method=VTP.encode)

    def rec(dec):
        r = model.apply({"params": {"pixel_decoder": dec}}, z, method=VTP.decode)
        return jnp.mean(jnp.abs(images.to_lpips_range(r) - images.to_lpips_range(jnp.asarray(x))))

    def gan(dec):
        r = model.apply({"params": {"pixel_decoder": dec}}, z, method=VTP.decode)
        return -jnp.mean(disc.apply({"params": state.disc}, images.to_lpips_range(r)))  # hinge generator loss

    g_rec, g_gan = jax.grad(rec)(state.decoder), jax.grad(gan)(state.decoder)
    w_rec, w_gan = g_rec["proj_out"]["kernel"], g_gan["proj_out"]["kernel"]
    expected = np.linalg.norm(w_rec) / (np.linalg.norm(w_gan) + 1e-4)
    assert float(m["adaptive_weight"]) == pytest.approx(expected, rel=1e-4)
    assert float(m["l_rec"]) == pytest.approx(float(rec(state.decoder)), rel=1e-5)
    # Adam's first update is lr * g / (|g| + eps) elementwise: its sign is the total gradient's.
    total = jax.tree.map(lambda a, b: a + expected * s.disc_weight * b, g_rec, g_gan)
    moved = jax.tree.map(lambda new, old: np.sign(np.asarray(new - old)), state1.decoder, state.decoder)
    agree = jax.tree.map(lambda d, g: np.mean(d == -np.sign(np.asarray(g))), moved, total)
    assert min(jax.tree.leaves(agree)) > 0.99
    # the discriminator descends its hinge loss: real logits up, fake logits down
    r_px = images.to_lpips_range(model.apply({"params": {"pixel_decoder": state.decoder}}, z, method=VTP.decode))
    d_loss = lambda p: objectives.hinge_d_loss(disc.apply({"params": p}, images.to_lpips_range(jnp.asarray(x))),  # noqa: E731
                                               disc.apply({"params": p}, r_px))
    assert float(d_loss(state1.disc)) < float(d_loss(state.disc))


def test_stage2_resumes_exactly(tokenizer, tmp_path):
    def config(steps):  # a constant lr, so that the schedule does not depend on the run length
        c = stage2_config(tokenizer, steps=steps)
        c.optim.min_lr = c.optim.lr
        return c

    jobs.run(config(2), str(tmp_path / "a"))
    jobs.run(config(4), str(tmp_path / "a"))  # restores step 2 (with the data iterator), runs 2 more
    jobs.run(config(4), str(tmp_path / "b"))
    a, b = (tiny.restore_params(tmp_path / w, 4, field="decoder") for w in ("a", "b"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    a, b = (tiny.restore_params(tmp_path / w, 4, field="disc") for w in ("a", "b"))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_stage2_needs_a_tokenizer(tmp_path):
    c = stage2_config("")
    with pytest.raises(runner.ConfigError, match="train.init_from is empty"):
        jobs.run(c, str(tmp_path))
