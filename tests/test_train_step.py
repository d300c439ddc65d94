"""The sharded multi-objective step on tiny configs (8 fake CPU devices, see conftest)."""
import jax
import numpy as np
import pytest

import tiny
from vtp_jax.train import loop, pretrain, sharding


def tiny_config(name="demo", **objectives):
    c = tiny.get_config(name)
    c.objectives.update(objectives)
    return c


def test_demo_and_ablation_configs_validate():
    for name in ("demo", "vtp_s", "vtp_b", "vtp_l", "ae", "clip_ae", "ssl_ae"):
        c = tiny.load_config(name)
        c.objectives.lpips_weight = 0.0
        loop.validate(c, n_batch_shards=8)


def test_validation_errors_are_clear_and_early(tmp_path):
    c = tiny_config()
    c.data.batch_clip = 12
    c.data.batch_rec = 32
    c.objectives.lpips_weight = 1.0
    c.objectives.lpips_params = str(tmp_path / "nope.msgpack")
    with pytest.raises(loop.ConfigError) as e:
        loop.build(c, sharding.make_mesh((8, 1, 1)))
    msg = str(e.value)
    assert "data.batch_clip=12 is not divisible by the 8 batch shards" in msg
    assert "data.batch_rec=32 > data.batch_clip=12" in msg
    assert "nope.msgpack" in msg and "torch_convert" in msg
    with pytest.raises(loop.ConfigError, match="unknown config field.*model.widht"):
        c = tiny_config()
        c.model.widht = 3
        loop.validate(c, 1)
    with pytest.raises(ValueError, match="mesh .* needs 12 devices, 8 are present"):
        sharding.make_mesh((3, 4, 1))


@pytest.mark.parametrize("off", ["l_clip", "l_ssl", "l_rec"])
def test_objective_off_skips_its_forward(off):
    """Switching an objective off removes its compute from the step (XLA's FLOP count)."""
    def flops(config):
        tr = loop.build(config, sharding.make_mesh((1, 1, 1)))
        with loop.scope(tr):
            state = jax.eval_shape(tr.init, jax.random.key(0))
            batch = sharding.global_batch(pretrain.synthetic_batch(tr.config), tr.mesh)
            return loop.compiled_flops(tr.step.lower(state, batch, tr.lpips_params))

    full = flops(tiny_config())
    reduced = flops(tiny_config(**{off: 0.0}))
    assert reduced < 0.95 * full, (off, reduced, full)


@pytest.fixture(scope="module")
def single():
    """The tiny config's trainer on one device, shared by the tests below (one compile)."""
    return loop.build(tiny_config(), sharding.make_mesh((1, 1, 1)))


def steps(tr, n, batches=None):
    with loop.scope(tr):
        state = tr.init(jax.random.key(0))
        history = [jax.device_get(state)]
        metrics = []
        for i in range(n):
            batch = batches[i] if batches else pretrain.synthetic_batch(tr.config, seed=i)
            state, m = tr.step(state, sharding.global_batch(batch, tr.mesh), tr.lpips_params)
            history.append(jax.device_get(state))
            metrics.append(jax.device_get(m))
    return history, metrics


def test_step_is_mesh_invariant_and_fsdp_shards_params(single):
    c = tiny_config()
    ref, ref_m = steps(single, 1)
    for shape in [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)]:
        tr = loop.build(c, sharding.make_mesh(shape))
        with loop.scope(tr):
            state = tr.init(jax.random.key(0))
            state, m = tr.step(state, sharding.global_batch(pretrain.synthetic_batch(tr.config), tr.mesh), None)
        np.testing.assert_allclose(m["loss"], ref_m[0]["loss"], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
                     jax.device_get(state.params), ref[1].params)
        if shape == (1, 8, 1):
            dev0 = jax.devices()[0]
            local = sum(s.data.nbytes for x in jax.tree.leaves(state.params) for s in x.addressable_shards
                        if s.device == dev0)
            total = sum(x.nbytes for x in jax.tree.leaves(state.params))
            assert local < total / 4, (local, total)  # ~1/8 plus replicated vectors


def test_teacher_is_closed_form_ema_of_student(single):
    """teacher_k+1 = m_k teacher_k + (1 - m_k) student_k+1, m_k cosine from 0.992 to 1 over the run."""
    history, _ = steps(single, 3)
    o, n = single.config.objectives, single.config.train.steps
    expected = pretrain.teacher_of(history[0].params)
    for k in range(3):
        m = o.teacher_momentum_end + (o.teacher_momentum - o.teacher_momentum_end) * (1 + np.cos(np.pi * k / n)) / 2
        expected = jax.tree.map(lambda t, s: m * t + (1 - m) * s, expected, pretrain.teacher_of(history[k + 1].params))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     history[k + 1].teacher_params, expected)
    assert not np.allclose(history[3].params["trunk"]["cls_token"], history[0].params["trunk"]["cls_token"])


def test_nonfinite_step_is_skipped_and_counted(single):
    good = pretrain.synthetic_batch(single.config, seed=0)
    bad = {k: v.copy() for k, v in good.items()}
    bad["rec_images"][0, 0, 0, 0] = np.nan
    history, metrics = steps(single, 2, [bad, good])
    assert [int(m["nonfinite_total"]) for m in metrics] == [1, 1]
    assert [int(m["nonfinite_in_a_row"]) for m in metrics] == [1, 0]
    assert int(history[1].step) == 1
    jax.tree.map(np.testing.assert_array_equal, history[1].params, history[0].params)
    jax.tree.map(np.testing.assert_array_equal, history[1].teacher_params, history[0].teacher_params)
    np.testing.assert_array_equal(history[1].dino_center, history[0].dino_center)
    assert not np.array_equal(history[2].params["trunk"]["cls_token"], history[1].params["trunk"]["cls_token"])


def test_init_from_released_checkpoint(single, tmp_path):
    """--config.train.init_from: release-format weights replace the student and the teacher;
    what the release has no place for (the DINO head) keeps its fresh init."""
    from vtp_jax.checkpoints import released

    with loop.scope(single):
        donor = jax.device_get(single.init(jax.random.key(1)).params)
        released.export_release(single.model.config, donor, str(tmp_path), image_size=16)
        fresh = single.init(jax.random.key(0))
        fresh_head = jax.device_get(fresh.params["dino_head"])
        state = jax.device_get(loop._init_from_release(fresh, str(tmp_path)))
    for part in ("trunk", "pixel_decoder", "text", "visual_proj", "feature_bottleneck"):
        jax.tree.map(np.testing.assert_array_equal, state.params[part], donor[part])
    jax.tree.map(np.testing.assert_array_equal, state.params["dino_head"], fresh_head)
    jax.tree.map(np.testing.assert_array_equal, state.teacher_params["trunk"], donor["trunk"])
