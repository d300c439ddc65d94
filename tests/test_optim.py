"""train/optim.py against closed forms: the schedules at both ends and in between, the decay mask,
layer-wise lr scales and the frozen last layer (no movement at all, then movement)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vtp_jax import config as config_lib
from vtp_jax.train import optim


def optim_config(**kw):
    o = config_lib.optim_config()
    o.update(kw)
    return o


@pytest.mark.parametrize("warmup", [0, 10])
def test_lr_warmup_then_cosine(warmup):
    o = optim_config(lr=1e-3, min_lr=1e-5, warmup_steps=warmup)
    steps = 110
    s = optim.lr_schedule(o, steps)
    for k in (0, 1, warmup // 2, warmup, 35, 60, steps - 1, steps, steps + 50):
        if k < warmup:
            want = o.lr * k / warmup
        else:
            frac = min(k - warmup, steps - warmup) / (steps - warmup)
            want = o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + np.cos(np.pi * frac))
        assert float(s(k)) == pytest.approx(want, rel=1e-5, abs=1e-9), k


@pytest.mark.parametrize("start,end", [(0.04, 0.2), (0.0, 0.0), (0.0, 0.3), (0.992, 1.0), (0.5, 0.0)])
def test_cosine_ramp_closed_form_any_endpoints(start, end):
    n = 40
    s = optim.cosine_ramp(start, end, n)
    for k in (0, 1, 10, 20, 39, 40, 100):
        want = end + (start - end) * 0.5 * (1 + np.cos(np.pi * min(k, n) / n))
        assert float(s(k)) == pytest.approx(want, rel=1e-6, abs=1e-7), (k, start, end)
    assert float(s(0)) == pytest.approx(start) and float(s(n)) == pytest.approx(end, abs=1e-7)


def test_teacher_temperature_schedule():
    o = config_lib.objectives_config()
    o.warmup_teacher_temp, o.teacher_temp = 0.04, 0.07
    o.warmup_teacher_temp_steps = 0  # DINOv2: no warm-up means the final temperature from the start
    s = optim.teacher_temp_schedule(o)
    assert [float(s(k)) for k in (0, 1, 1000)] == pytest.approx([0.07] * 3)
    o.warmup_teacher_temp_steps = 30
    s = optim.teacher_temp_schedule(o)
    for k in (0, 15, 30, 31, 500):
        want = 0.04 + 0.03 * min(k, 30) / 30
        assert float(s(k)) == pytest.approx(want, rel=1e-6), k


def params():
    z = lambda *s: jnp.zeros(s)  # noqa: E731
    return {
        "trunk": {"patch_embed": {"kernel": z(2, 2, 3, 4), "bias": z(4)}, "cls_token": z(1, 1, 4),
                  "mask_token": z(1, 4), "blocks_0": {"attn": {"qkv": {"kernel": z(4, 3, 2, 2), "bias": z(3, 2, 2)}},
                                                      "norm1": {"scale": z(4)}},
                  "blocks_1": {"mlp": {"w1": {"kernel": z(4, 8)}}}, "norm": {"scale": z(4)}},
        "text": {"positional_embedding": z(5, 4), "logit_scale": z(), "token_embedding": z(10, 4)},
        "dino_head": {"mlp_0": {"kernel": z(4, 6)}, "prototypes": z(6, 16)},
    }


def test_decay_mask_leaves():
    mask = optim.decay_mask(params())
    decayed = {"/".join(getattr(k, "key", str(k)) for k in path)
               for path, v in jax.tree_util.tree_flatten_with_path(mask)[0] if v}
    assert decayed == {"trunk/patch_embed/kernel", "trunk/blocks_0/attn/qkv/kernel", "trunk/blocks_1/mlp/w1/kernel",
                       "text/token_embedding", "dino_head/mlp_0/kernel", "dino_head/prototypes"}


def test_layer_lr_scales():
    s = optim.layer_lr_scales(params(), depth=2, layer_decay=0.5, patch_embed_mult=0.2)
    assert s["trunk"]["blocks_0"]["attn"]["qkv"]["kernel"] == 0.5 ** 2
    assert s["trunk"]["blocks_1"]["mlp"]["w1"]["kernel"] == 0.5 ** 1
    assert s["trunk"]["patch_embed"]["kernel"] == pytest.approx(0.5 ** 3 * 0.2)
    assert s["trunk"]["cls_token"] == 0.5 ** 3 and s["trunk"]["norm"]["scale"] == 1.0
    assert s["dino_head"]["prototypes"] == 1.0 and s["text"]["token_embedding"] == 1.0


def run_updates(o, p, n, freeze=0, depth=2, grad_scale=1.0):
    """n optimizer updates with constant random gradients; returns the params after each."""
    tx = optim.make_optimizer(o, p, n, depth, freeze)
    state = tx.init(p)
    g = jax.tree.map(lambda x: grad_scale * jax.random.normal(jax.random.key(x.size), x.shape), p)
    history = [p]
    for _ in range(n):
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
        history.append(p)
    return history


def test_frozen_last_layer_is_bit_identical_then_moves():
    p = jax.tree.map(lambda x: x + 0.3, params())  # nonzero: weight decay would shrink them
    o = optim_config(lr=1e-2, warmup_steps=0, weight_decay=0.1, weight_decay_end=0.1)
    history = run_updates(o, p, 6, freeze=3)
    for k in range(1, 4):  # the first 3 updates leave the prototypes exactly alone
        np.testing.assert_array_equal(history[k]["dino_head"]["prototypes"], p["dino_head"]["prototypes"])
        assert not np.array_equal(history[k]["dino_head"]["mlp_0"]["kernel"], history[k - 1]["dino_head"]["mlp_0"]["kernel"])
    assert not np.array_equal(history[4]["dino_head"]["prototypes"], p["dino_head"]["prototypes"])


def test_weight_decay_zero_and_layer_decay_steps():
    """weight_decay 0 (a schedule starting and ending at 0) works; layer decay scales the update."""
    p = jax.tree.map(lambda x: x + 1.0, params())
    o = optim_config(lr=1e-2, warmup_steps=0, weight_decay=0.0, weight_decay_end=0.0, clip_grad=0.0,
                     layer_decay=0.5, patch_embed_lr_mult=1.0)
    h = run_updates(o, p, 1, depth=2)
    # Adam's first step is lr * g / (|g| + eps) ~ lr * sign(g) for each element, then scaled.
    step0 = np.abs(np.asarray(h[1]["trunk"]["blocks_0"]["attn"]["qkv"]["kernel"] - 1.0))
    step1 = np.abs(np.asarray(h[1]["trunk"]["blocks_1"]["mlp"]["w1"]["kernel"] - 1.0))
    head = np.abs(np.asarray(h[1]["dino_head"]["mlp_0"]["kernel"] - 1.0))
    np.testing.assert_allclose(step0.mean(), 0.25 * 1e-2, rtol=1e-2)
    np.testing.assert_allclose(step1.mean(), 0.5 * 1e-2, rtol=1e-2)
    np.testing.assert_allclose(head.mean(), 1e-2, rtol=1e-2)


def test_weight_decay_follows_its_schedule():
    """With zero gradients AdamW only decays: p_k+1 = p_k (1 - lr_k wd_k) on decayed leaves."""
    o = optim_config(lr=1e-2, min_lr=1e-2, warmup_steps=0, weight_decay=0.0, weight_decay_end=0.4, clip_grad=0.0)
    n = 4
    p = {"w": jnp.ones((3, 3)), "b": jnp.ones((3,))}
    tx = optim.make_optimizer(o, p, n, depth=1)
    state, want = tx.init(p), 1.0
    wd = optim.cosine_ramp(0.0, 0.4, n)
    for k in range(n):
        u, state = tx.update(jax.tree.map(jnp.zeros_like, p), state, p)
        p = optax.apply_updates(p, u)
        want *= 1 - 1e-2 * float(wd(k))
        np.testing.assert_allclose(p["w"], want, rtol=1e-6)
        np.testing.assert_array_equal(p["b"], 1.0)  # vectors never decay
