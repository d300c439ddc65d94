"""train.accum_steps = 4 against the whole-batch step (accum_steps = 1) on the same batch.

The reference is the k = 1 step, which tests/test_step_composition.py checks against a NumPy
re-derivation. Every logged loss and diagnostic, every per-loss gradient norm, the updated
parameters and the DINO / iBOT centers must agree to float32 rounding: for all objectives together
and each alone, with centering and with Sinkhorn-Knopp, with the head's BatchNorm and without, on
one device and on a (data 2, fsdp 4) mesh of 8 CPU devices. Each (config, k, mesh) step compiles
once per session.
"""
import functools

import jax
import numpy as np
import pytest

import tiny
from vtp_jax import jobs, sharding
from vtp_jax.jobs import pretrain
from vtp_jax.train import runner

B = 32  # B_clip = B_ssl = B_rec: 4 micro-batches of one image per batch shard on 8 devices
ONE, EIGHT = (1, 1, 1), (2, 4, 1)


def config(k, centering="centering", use_bn=True, only=None):
    c = tiny.get_config()
    c.data.batch_clip = c.data.batch_ssl = c.data.batch_rec = B
    c.train.accum_steps = k
    c.objectives.centering = centering
    c.objectives.center_momentum = 0.9  # both terms of the center's EMA matter
    c.model.head.use_bn = use_bn
    if only:
        for name in ("l_clip", "l_ssl", "l_rec"):
            if name != only:
                c.objectives[name] = 0.0
    return c


def accum_batch(c):
    """Synthetic data whose iBOT masks stay within every (micro-)batch shard's static bound of
    masked patches (3 per image here), so nothing is dropped with either k."""
    batch = pretrain.synthetic_batch(c, seed=3)
    if "ssl_masks" in batch:
        m = np.zeros_like(batch["ssl_masks"]).reshape(B, 2, -1)
        m[::2, 0, :2] = True  # every other image: 2 of crop 0's 4 patches (iBOT weights 1/2)
        m[::3, 1, 3] = True  # every third: 1 of crop 1's
        batch["ssl_masks"] = m.reshape(batch["ssl_masks"].shape)
    return batch


@functools.lru_cache(maxsize=None)
def step_result(k, mesh, centering="centering", use_bn=True, only=None):
    """(metrics, new state) of one step from the same init and batch, as host arrays."""
    tr = jobs.build(config(k, centering, use_bn, only), sharding.make_mesh(mesh))
    with runner.scope(tr):
        state = tr.init(jax.random.key(0))
        new_state, metrics = tr.step(state, sharding.global_batch(accum_batch(tr.config), tr.mesh), tr.consts)
        return jax.device_get(metrics), jax.device_get(new_state)


def assert_same_step(ref, acc):
    (m1, s1), (m4, s4) = ref, acc
    assert set(m4) == set(m1), set(m4) ^ set(m1)
    for key in m1:  # losses, per-loss and total gradient norms, diagnostics, counters
        np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    if "ibot_dropped" in m1:
        assert m1["ibot_dropped"] == m4["ibot_dropped"] == 0 and m1["ibot_masked"] > 0
    for name in ("params", "teacher_params", "dino_center", "ibot_center"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=name),
                     getattr(s1, name), getattr(s4, name))


# mesh, centering, head BatchNorm. The SSL paths: with BatchNorm the head runs over the whole
# batch's cached trunk outputs; without it, per micro-batch, against whole-batch targets
# (Sinkhorn-Knopp) or with the teacher inside the student's scan (centering). Each path and each
# centering runs on one device in the quick set (the l_ssl-alone test takes Sinkhorn-Knopp without
# BatchNorm); the 8-device programs compile about twice as long and are marked slow.
CASES = [
    pytest.param(ONE, "sinkhorn_knopp", True, id="one-device-sinkhorn-bn"),
    pytest.param(ONE, "centering", False, id="one-device-centering-nobn"),
    pytest.param(EIGHT, "centering", True, id="8-devices-centering-bn", marks=pytest.mark.slow),
    pytest.param(EIGHT, "sinkhorn_knopp", False, id="8-devices-sinkhorn-nobn", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("mesh,centering,use_bn", CASES)
def test_all_objectives_match_whole_batch_step(mesh, centering, use_bn):
    assert_same_step(step_result(1, mesh, centering, use_bn), step_result(4, mesh, centering, use_bn))


@pytest.mark.parametrize("only", ["l_clip", "l_ssl", "l_rec"])
def test_each_objective_alone_matches_whole_batch_step(only):
    case = (ONE, "sinkhorn_knopp", False, only)
    assert_same_step(step_result(1, *case), step_result(4, *case))


def test_koleo_is_over_the_whole_batch():
    """The choice documented at train.accum_steps: KoLeo's neighbours are searched among all B
    rows, not per micro-batch; checked against NumPy on the student's cls tokens, where the
    per-micro-batch value differs by far more than the tolerance."""
    from vtp_jax.models.vtp import VTP

    c = config(1)
    tr = jobs.build(c, sharding.make_mesh(ONE))
    batch = accum_batch(tr.config)
    metrics, _ = step_result(4, ONE, "sinkhorn_knopp", True)  # a step the tests above compiled
    with runner.scope(tr):
        params = tr.init(jax.random.key(0)).params
        g, m = batch["ssl_global"], batch["ssl_masks"]
        cls = jax.jit(lambda p, x, mk: tr.model.apply({"params": p}, x, mk, method=VTP.encode_features)["cls"])(
            params, g.reshape(-1, *g.shape[2:]), m.reshape(-1, *m.shape[2:]))
    cls = np.asarray(cls, np.float64).reshape(B, 2, -1)

    def koleo(x):
        x = x / np.linalg.norm(x, axis=-1, keepdims=True)
        dots = x @ x.T
        np.fill_diagonal(dots, -1)
        return -np.log(np.linalg.norm(x - x[dots.argmax(-1)] + 1e-8, axis=-1) + 1e-8).mean()

    whole = sum(koleo(cls[:, i]) for i in range(2))
    per_micro = np.mean([sum(koleo(cls[j:j + B // 4, i]) for i in range(2)) for j in range(0, B, B // 4)])
    assert metrics["l_koleo"] == pytest.approx(whole, rel=1e-5)
    assert abs(per_micro - whole) > 0.05, (per_micro, whole)


def test_micro_batches_take_rows_from_every_batch_shard():
    """Micro-batch i is rows i*m .. i*m + m - 1 of each shard's block (no communication), and
    merging the micro-batches restores the batch's order."""
    from vtp_jax import objectives

    mesh = sharding.make_mesh(EIGHT)
    x = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    with runner.scope_of(mesh):
        xs = sharding.global_batch({"x": x}, mesh)["x"]
        f = jax.jit(lambda x: jax.lax.scan(lambda c, i: (c, objectives.micro_batch(x, i, 4)), None, np.arange(4))[1])
        stacked = f(xs)
        merged = jax.jit(objectives.merge_micro_batches)(stacked)
    stacked = np.asarray(stacked)
    np.testing.assert_array_equal(stacked[1], x.reshape(8, 4, 3)[:, 1].reshape(8, 3))  # row 1 of each shard's 4
    np.testing.assert_array_equal(np.asarray(merged), x)


def test_accum_steps_must_divide_every_batch_per_shard():
    c = config(4)
    c.data.batch_rec = 16  # 2 per shard on 8 shards
    with pytest.raises(runner.ConfigError) as e:
        jobs.validate(c, n_batch_shards=8)
    assert ("train.accum_steps=4 must divide every per-step batch per batch shard (8 shards of data x fsdp): "
            "data.batch_clip=32 (4 per shard), data.batch_ssl=32 (4 per shard), data.batch_rec=16 (2 per shard)"
            in str(e.value))
    jobs.validate(c, n_batch_shards=4)  # 8 / 4 per shard
    c.train.accum_steps = 0  # auto: no divisibility to check until the compile plan picks k
    jobs.validate(c, n_batch_shards=8)
    c.train.accum_steps = -1
    with pytest.raises(runner.ConfigError, match=r"train.accum_steps=-1: expected an integer >= 1, or 0 \(auto"):
        jobs.validate(c, n_batch_shards=1)


def test_model_flops_count_every_micro_batch():
    """MFU's numerator (runner.model_flops) counts the scans over micro-batches k times: the
    accumulated step has the whole step's FLOPs plus the gradient-free forwards of its cached
    trunk outputs (CLIP; with the head's BatchNorm, all SSL crops), never 1 / k of them."""
    def flops(k):
        tr = jobs.build(config(k), sharding.make_mesh(ONE))
        with runner.scope(tr):
            state = jax.eval_shape(tr.init, jax.random.key(0))
            batch = sharding.global_batch(accum_batch(tr.config), tr.mesh)
            return runner.model_flops(tr.step, state, batch, tr.consts)

    ratio = flops(4) / flops(1)
    assert 1.0 < ratio < 1.5, ratio


@pytest.mark.slow
def test_demo_config_accumulated_step_matches():
    """configs/demo.py with --config.train.accum_steps=4 reproduces accum_steps=1's first-step
    losses and per-loss gradient norms (the demo's 64 px model; compiles for minutes)."""
    results = []
    for k in (1, 4):
        c = tiny.load_config("demo")
        c.evals = {}
        c.train.accum_steps = k
        tr = jobs.build(c, sharding.make_mesh(ONE))
        with runner.scope(tr):
            state = tr.init(jax.random.key(0))
            batch = sharding.global_batch(pretrain.synthetic_batch(tr.config, seed=0), tr.mesh)
            results.append(jax.device_get(tr.step(state, batch, tr.consts)[1]))
    m1, m4 = results
    assert m1["ibot_dropped"] == m4["ibot_dropped"] == 0
    for key in sorted(m1):
        if key.startswith(("l_", "grad_norm")) or key == "loss":
            np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
