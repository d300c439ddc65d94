"""Sampling the LightningDiT at the official protocol: CFG on the channels the official sampler
guides, and latent grids other than 16 x 16 (512 px images: 32 x 32).

The references are re-derived here: the official `forward_with_cfg` semantics (LightningDiT's
models/lightningdit.py, read, not copied) as a NumPy function around the float64 NumPy forward of
tests/test_dit.py, driven by the official sampler's batch doubling and Euler steps on the shifted
grid; and that NumPy forward generalized to any token grid.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import vtp_jax
from test_dit import CLASSES, C, D, DH, P, official_state_dict, np_block, np_rope_angles, np_sincos, np_timestep, \
    linear, rms, silu
from vtp_jax import sampling
from vtp_jax.models import dit

NULL = CLASSES


def np_forward_any_grid(sd, x, t, y):
    """tests/test_dit.np_forward for a (B, H, W, C) latent of any grid; the sd's buffers must be
    the tables of that grid (as an official checkpoint trained at that size holds)."""
    bsz, h, w, _ = x.shape
    gh, gw = h // P, w // P
    patches = x.reshape(bsz, gh, P, gw, P, C).transpose(0, 1, 3, 5, 2, 4).reshape(bsz, gh * gw, C * P * P)
    tokens = patches @ sd["x_embedder.proj.weight"].reshape(D, -1).T + sd["x_embedder.proj.bias"] + sd["pos_embed"][0]
    temb = linear(sd, "t_embedder.mlp.2", silu(linear(sd, "t_embedder.mlp.0", np_timestep(t))))
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        tokens = np_block(sd, f"blocks.{i}", tokens, c, qk_norm=True)
    shift, scale = np.split(linear(sd, "final_layer.adaLN_modulation.1", silu(c))[:, None], 2, -1)
    out = linear(sd, "final_layer.linear", rms(tokens, sd["final_layer.norm_final.weight"]) * (1 + scale) + shift)
    return out.reshape(bsz, gh, gw, P, P, C).transpose(0, 1, 3, 2, 4, 5).reshape(bsz, h, w, C)


def state_dict_for_grid(n):
    """The tiny official-layout model of test_dit with the buffers of an n x n token grid."""
    sd = official_state_dict()
    sd["pos_embed"] = np_sincos(n, D)[None].astype(np.float32)
    angles = np_rope_angles(n, DH)
    sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"] = np.cos(angles).astype(np.float32), np.sin(angles).astype(
        np.float32)
    return sd


# ------------------------------------------------------------------------------------------
# The official CFG, re-derived.
# ------------------------------------------------------------------------------------------
def official_cfg_sample(sd, noise, y, grid, cfg_scale, cfg_interval_start, cfg_interval=True):
    """The official sampler with guidance: the batch doubled as [z, z] with labels [y, null], each
    Euler step calling forward_with_cfg, whose semantics are: run the model on the first half
    twice (cond, uncond); guide only channels 0..2 (NCHW), and only if cfg_interval is off or
    t[0] >= cfg_interval_start; the guided channels are written to both halves while every other
    channel keeps each half's own output; the first half of the final batch is the sample.
    Plain NumPy in the official NCHW layout (cat, split and permute as torch does them)."""

    def model(x_nchw, t, labels):  # the network, float64 NumPy on NHWC
        return np_forward_any_grid(sd, x_nchw.transpose(0, 2, 3, 1), t, labels).transpose(0, 3, 1, 2)

    def forward_with_cfg(x, t, labels):
        half = x[: len(x) // 2]
        out = model(np.concatenate([half, half]), t, labels)
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = np.split(eps, 2)
        half_eps = uncond + cfg_scale * (cond - uncond)
        if cfg_interval and t[0] < cfg_interval_start:
            half_eps = cond
        return np.concatenate([np.concatenate([half_eps, half_eps]), rest], axis=1)

    z = noise.astype(np.float64).transpose(0, 3, 1, 2)
    x = np.concatenate([z, z])
    labels = np.concatenate([np.asarray(y), np.full(len(y), NULL)])
    for t0, t1 in zip(grid[:-1], grid[1:]):
        x = x + (t1 - t0) * forward_with_cfg(x, np.full(len(x), float(t0)), labels)
    return x[: len(y)].transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tiny_dit():
    return vtp_jax.load_lightningdit(official_state_dict())


def _case(size=8, batch=3, seed=5):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((batch, size, size, C)).astype(np.float32)
    return noise, np.array([1, 7, 4][:batch])


STEPS, SHIFT, SCALE, START = 4, 0.3, 4.0, 0.2  # grid 0, 0.13, 0.375, 1: two unguided steps, one guided


def test_cfg_channels_3_is_the_official_forward_with_cfg(tiny_dit):
    noise, y = _case()
    grid = sampling.grid(STEPS, SHIFT).astype(np.float64)
    want = official_cfg_sample(official_state_dict(), noise, y, grid, SCALE, START)
    got = np.asarray(tiny_dit.sample(noise, y, num_steps=STEPS, shift=SHIFT, cfg_scale=SCALE,
                                     cfg_interval_start=START, cfg_channels=3), np.float64)
    err = np.abs(got - want).max()
    print(f"max |ours - official forward_with_cfg| = {err:.3g} (max |x| {np.abs(want).max():.3g})")
    assert err < 1e-4 * np.abs(want).max()
    # Guiding all channels (the default) is another sampler: the 4th channel moves.
    every = np.asarray(tiny_dit.sample(noise, y, num_steps=STEPS, shift=SHIFT, cfg_scale=SCALE,
                                       cfg_interval_start=START), np.float64)
    assert np.abs(every - want)[..., 3].max() > 1e-2 * np.abs(want).max()
    # The official demo mode (cfg_interval=False) guides every step: our start 0.
    want = official_cfg_sample(official_state_dict(), noise, y, grid, SCALE, START, cfg_interval=False)
    got = tiny_dit.sample(noise, y, num_steps=STEPS, shift=SHIFT, cfg_scale=SCALE, cfg_channels=3)
    assert np.abs(np.asarray(got, np.float64) - want).max() < 1e-4 * np.abs(want).max()


def test_guided_velocity_cfg_channels():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 3, 5)), jnp.float32)
    y, t = jnp.array([1, 4]), jnp.array([0.1, 0.5])

    def model(x, t, labels):
        return x * (1.0 + labels[:, None, None, None]) + t[:, None, None, None] ** 2 * jnp.arange(5.0)

    cond, uncond = model(x, t, y), model(x, t, jnp.full((2,), NULL))
    full = uncond + 3.0 * (cond - uncond)
    got = sampling.guided_velocity(model, x, t, y, NULL, 3.0, 0.0, cfg_channels=3)
    np.testing.assert_allclose(got[..., :3], full[..., :3], rtol=1e-6)
    np.testing.assert_array_equal(got[..., 3:], cond[..., 3:])
    for k in (None, 5, 9):  # k >= channels guides them all
        np.testing.assert_allclose(sampling.guided_velocity(model, x, t, y, NULL, 3.0, 0.0, cfg_channels=k), full,
                                   rtol=1e-6)
    got = sampling.guided_velocity(model, x, t, y, NULL, 3.0, 0.3, cfg_channels=3)  # sample 0 below the interval
    np.testing.assert_array_equal(got[0], cond[0])
    with pytest.raises(ValueError, match="cfg_channels"):
        sampling.guided_velocity(model, x, t, y, NULL, 3.0, 0.0, cfg_channels=0)


class _PixelsAreLatents:
    """A stand-in tokenizer whose decoder returns the first 3 latent channels as normalized pixels."""

    def apply(self, variables, z, method=None):
        del variables, method
        return z[..., :3]


def test_generator_and_evaluator_override_take_cfg_channels(tiny_dit):
    """The DiT job's Generator (dit.sample.cfg_channels) and the generation evaluator's override
    (Generator.with_sample) sample as the official sampler, then un-normalize and decode."""
    from vtp_jax import jobs
    from vtp_jax.images import IMAGENET_MEAN, IMAGENET_STD
    from vtp_jax.jobs.dit import Generator

    noise, y = _case()
    grid = sampling.grid(STEPS, SHIFT).astype(np.float64)
    want = official_cfg_sample(official_state_dict(), noise, y, grid, SCALE, START)
    mean, std, mult = np.linspace(-0.2, 0.2, C), np.linspace(0.5, 1.5, C), 0.8
    pixels = np.clip((want / mult * std + mean)[..., :3] * IMAGENET_STD + IMAGENET_MEAN, 0, 1)
    sample = jobs.default_config("dit").dit.sample
    sample.update(num_steps=STEPS, shift=SHIFT, cfg_scale=SCALE, cfg_interval_start=START)
    plain = Generator(tiny_dit.model, sample, jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32), mult,
                      _PixelsAreLatents(), {})
    official = plain.with_sample(cfg_channels=3)  # a new Generator on a copy of dit.sample
    assert official.sample.cfg_channels == 3 and plain.sample.cfg_channels is None
    got = np.asarray(official.images(tiny_dit.params, jnp.asarray(noise), jnp.asarray(y)), np.float64)
    np.testing.assert_allclose(got, pixels, atol=1e-5)


def test_generation_evaluator_guidance_fields():
    from vtp_jax.evals import evaluator

    e = evaluator.resolved(ml_collections.ConfigDict(dict(type="generation", cfg_channels=3)))
    assert e.cfg_channels == 3 and e.cfg_scale is None and e.cfg_interval_start is None
    assert e.sfid and e.precision_recall and e.nearest_k == 3


def test_evaluator_entries_guide_as_the_cfg_formula_says(tiny_dit, tmp_path):
    """An entry's cfg_scale / cfg_interval_start / cfg_channels (evaluator.build -> _guided) replace
    the DiT job's dit.sample (here: unguided) in the generation and class_conditional evaluators.
    One Euler step from t = 0, so each sample is noise + v with v = uncond + s * (cond - uncond),
    both velocities from the float64 NumPy forward; the class_conditional run classifies exactly
    those samples."""
    from flax import linen as nn
    from flax import serialization

    from vtp_jax import jobs, sharding
    from vtp_jax.evals import evaluator
    from vtp_jax.images import IMAGENET_MEAN, IMAGENET_STD
    from vtp_jax.jobs.dit import Generator
    from vtp_jax.models.classifier import DomainClassifier

    sd = official_state_dict()
    mean, std, mult = np.linspace(-0.2, 0.2, C), np.linspace(0.5, 1.5, C), 0.8

    def want_images(noise, y, scale, channels=None):
        x, t = noise.astype(np.float64), np.zeros(len(y))
        cond, uncond = np_forward_any_grid(sd, x, t, y), np_forward_any_grid(sd, x, t, np.full(len(y), NULL))
        v = uncond + scale * (cond - uncond)
        if channels is not None:
            v[..., channels:] = cond[..., channels:]
        z = (x + v) / mult * std + mean
        return np.clip(z[..., :3] * IMAGENET_STD + IMAGENET_MEAN, 0, 1)

    sample = jobs.default_config("dit").dit.sample
    sample.update(num_steps=2, shift=0.0, cfg_scale=1.0, cfg_interval_start=0.0)  # grid [0, 1]; no guidance
    generator = Generator(tiny_dit.model, sample, jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32), mult,
                          _PixelsAreLatents(), {})
    classifier = tmp_path / "classifier.msgpack"
    net = DomainClassifier(num_classes=16, width=4)
    classifier.write_bytes(serialization.msgpack_serialize(
        nn.meta.unbox(net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"])))
    config = ml_collections.ConfigDict(dict(evals=dict(
        plain=evaluator.entry("generation"),
        official=evaluator.entry("generation", cfg_scale=4.0, cfg_channels=3),
        late=evaluator.entry("generation", cfg_scale=4.0, cfg_interval_start=0.5),  # t = 0 is below: unguided
        cc=evaluator.entry("class_conditional", classifier_params=str(classifier), cfg_scale=2.5,
                           samples_per_class=1, batch_size=CLASSES, bootstrap=0),
    )))
    evs = evaluator.build(config, generator, sharding.make_mesh((1, 1, 1)))
    assert evs["plain"].generator is generator  # no guidance field set: the DiT job's dit.sample
    assert (evs["official"].generator.sample.cfg_scale, evs["official"].generator.sample.cfg_channels) == (4.0, 3)
    assert generator.sample.cfg_scale == 1.0 and generator.sample.cfg_channels is None  # not changed in place

    noise, y = _case()
    got = {name: np.asarray(evs[name].generator.images(tiny_dit.params, jnp.asarray(noise), jnp.asarray(y)))
           for name in evs}
    want = {"plain": want_images(noise, y, 1.0), "official": want_images(noise, y, 4.0, channels=3),
            "late": want_images(noise, y, 1.0), "cc": want_images(noise, y, 2.5)}
    for name in evs:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)
    assert np.abs(got["official"] - got["plain"]).max() > 0.1 and np.abs(got["cc"] - got["plain"]).max() > 0.1

    # The class_conditional run scores the guided samples: its noise (seeded), labels 0..CLASSES-1.
    seen, rng = [], np.random.default_rng(1)

    def classify(params, images):
        seen.append(np.asarray(images))
        return jnp.zeros((len(images), CLASSES)), jnp.asarray(rng.standard_normal((len(images), 8)))

    cc = evs["cc"]
    cc._classify, cc._real = classify, rng.standard_normal((32, 8))
    cc.run(tiny_dit.params)
    labels = np.arange(CLASSES)
    noise = np.random.default_rng(cc.e.seed).standard_normal((CLASSES, 8, 8, C)).astype(np.float32)
    quantize = lambda x: np.floor(np.float32(255) * x.astype(np.float32)) / np.float32(255)  # noqa: E731
    quantized = quantize(want_images(noise, labels, 2.5))
    assert len(seen) == 1 and np.abs(seen[0] - quantized).max() <= 1.001 / 255  # a floor boundary at most
    assert np.mean(np.abs(seen[0] - quantized) < 1e-6) > 0.99
    unguided = quantize(want_images(noise, labels, 1.0))
    assert np.abs(seen[0] - unguided).max() > 0.1


# ------------------------------------------------------------------------------------------
# Any latent grid: 32 x 32 (512 px images).
# ------------------------------------------------------------------------------------------
def test_32x32_latent_grid_forward_and_sample(tiny_dit):
    sd32 = state_dict_for_grid(32 // P)
    loaded32 = vtp_jax.load_lightningdit(sd32)
    assert loaded32.config["input_size"] == 32  # from the checkpoint's buffers
    noise, y = _case(size=32, batch=2)
    t = np.array([0.2, 0.9], np.float32)
    want = np_forward_any_grid(sd32, noise.astype(np.float64), t.astype(np.float64), y)
    got = np.asarray(loaded32.velocity(noise, t, y), np.float64)
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    # No parameter depends on the grid: the 8 x 8 checkpoint runs at 32 x 32 with that grid's tables.
    np.testing.assert_allclose(np.asarray(tiny_dit.velocity(noise, t, y)), got, atol=1e-5)
    # A guided sample on the 32 x 32 grid against the official sampler.
    grid = sampling.grid(3, SHIFT).astype(np.float64)
    want = official_cfg_sample(sd32, noise, y, grid, SCALE, 0.0)
    got = np.asarray(loaded32.sample(noise, y, num_steps=3, shift=SHIFT, cfg_scale=SCALE, cfg_channels=3), np.float64)
    print(f"32 x 32 grid: max |ours - official sampler| = {np.abs(got - want).max():.3g} (max |x| "
          f"{np.abs(want).max():.3g})")
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    with pytest.raises(ValueError, match="multiples of patch_size"):
        tiny_dit.velocity(noise[:, :31], t, y)


def test_dit_job_model_follows_the_latents():
    """The DiT job sizes the model from the latents' shape (meta.json or the official shards)."""
    from vtp_jax import jobs
    from vtp_jax.jobs import dit as dit_job

    c = jobs.default_config("dit")
    c.dit.size = "tiny"
    for h in (16, 32):
        m = dit_job.model_from(c, {"shape": [h, h, 8], "num_classes": 10})
        assert m.input_size == h
        x = jnp.zeros((1, h, h, 8))
        out = jax.eval_shape(lambda: m.init_with_output(jax.random.key(0), x, jnp.zeros(1), jnp.zeros(1, jnp.int32)))
        assert out[0].shape == (1, h, h, 8)
    assert dit.LightningDiT(input_size=32).input_size == 32
