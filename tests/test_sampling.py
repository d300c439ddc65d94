"""Rectified-flow loss and ODE samplers against closed forms and NumPy re-derivations."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtp_jax import sampling
from vtp_jax.objectives import flow


# ------------------------------------------------------------------------------------------
# Objective.
# ------------------------------------------------------------------------------------------
def test_interpolate_and_flow_loss_match_numpy():
    rng = np.random.default_rng(0)
    x0, x1, v = (rng.standard_normal((3, 2, 3, 4)).astype(np.float32) for _ in range(3))
    v[0, 1, 2] = 0.0  # a zero vector: torch's cosine clamps each norm at 1e-8, giving cos = 0
    t = np.array([0.0, 0.3, 1.0], np.float32)
    np.testing.assert_allclose(np.asarray(flow.interpolate(x0, x1, t)),
                               t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0, atol=1e-6)
    u = (x1 - x0).astype(np.float64)
    v64 = v.astype(np.float64)
    mse = ((v64 - u) ** 2).reshape(3, -1).mean(1)
    cos = np.zeros((3, 2, 3))
    for b, i, j in np.ndindex(3, 2, 3):  # cosine over channels at each position
        a, c = v64[b, i, j], u[b, i, j]
        cos[b, i, j] = a @ c / (max(np.linalg.norm(a), 1e-8) * max(np.linalg.norm(c), 1e-8))
    want = mse + (1 - cos).reshape(3, -1).mean(1)
    got = flow.flow_loss(jnp.asarray(v), jnp.asarray(x0), jnp.asarray(x1))
    assert got.shape == (3,)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    assert cos[0, 1, 2] == 0.0
    # A DiT outputs exactly 0 at initialization: the gradient there is finite and torch's (the MSE's
    # -2u / n plus the cosine's -u / (||u|| eps) / positions: v / max(||v||, eps) has slope 1 / eps).
    g = jax.grad(lambda p: flow.flow_loss(p, jnp.asarray(x0), jnp.asarray(x1)).sum())(jnp.zeros_like(v))
    assert np.all(np.isfinite(np.asarray(g)))
    want = -2 * u / u[0].size - u / np.linalg.norm(u, axis=-1, keepdims=True) / 1e-8 / 6
    np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=1e-4)


@pytest.mark.parametrize("mu,sigma", [(-0.5, 1.25), (-0.75, 1.0)])  # VTP-S/B and VTP-L
def test_logit_normal_t_moments(mu, sigma):
    z, w = np.polynomial.hermite_e.hermegauss(80)  # E[f(N(0,1))] by Gauss-Hermite quadrature
    w = w / w.sum()
    s = 1 / (1 + np.exp(-(mu + sigma * z)))
    mean, std = (w * s).sum(), np.sqrt((w * (s - (w * s).sum()) ** 2).sum())
    t = np.asarray(flow.sample_logit_normal_t(jax.random.key(0), (200_000,), mu, sigma))
    assert 0 < t.min() and t.max() < 1
    assert abs(t.mean() - mean) < 3e-3 and abs(t.std() - std) < 3e-3


# ------------------------------------------------------------------------------------------
# Time grid.
# ------------------------------------------------------------------------------------------
def test_time_shift_and_grid():
    np.testing.assert_array_equal(sampling.grid(5), [0.0, 0.25, 0.5, 0.75, 1.0])
    assert sampling.grid(250).shape == (250,)  # grid points: 249 steps
    for s in (0.3, 0.075, 3.0):
        lin = np.linspace(0, 1, 7)
        np.testing.assert_allclose(sampling.grid(7, s), s * lin / (1 + (s - 1) * lin), rtol=1e-6, atol=1e-7)
        g = sampling.grid(7, s)
        # float32 as the official: its end point is 1 only to rounding (1.0000002 for s = 0.075)
        assert g[0] == 0.0 and abs(g[-1] - 1.0) < 1e-6 and np.all(np.diff(g) > 0)
    # The official default 0 (and any s <= 0) means no shift; s = 1 is the identity.
    for s in (0.0, -1.0, 1.0):
        np.testing.assert_allclose(sampling.grid(11, s), np.linspace(0, 1, 11), atol=1e-7)
    assert sampling.grid(5, 0.3)[1] < 0.25  # s < 1 packs the grid towards the noise (t = 0)
    with pytest.raises(ValueError, match="grid points"):
        sampling.grid(1)


def test_euler_and_heun_follow_the_grid():
    """With v = t, Euler is the left Riemann sum over the shifted grid, Heun the trapezoid (exactly 1/2)."""
    v = lambda x, t: jnp.broadcast_to(t[:, None], x.shape)  # noqa: E731
    x0 = jnp.zeros((2, 1))
    g = 0.3 * np.linspace(0, 1, 5) / (1 - 0.7 * np.linspace(0, 1, 5))
    euler = jax.jit(lambda x: sampling.ode_sample(v, x, 5, "euler", 0.3))(x0)
    np.testing.assert_allclose(np.asarray(euler), np.sum(np.diff(g) * g[:-1]), rtol=1e-6)
    heun = sampling.ode_sample(v, x0, 5, "heun", 0.3)
    np.testing.assert_allclose(np.asarray(heun), 0.5, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Convergence on a 1-D Gaussian flow with a known velocity field.
# ------------------------------------------------------------------------------------------
M, S = 2.0, 0.5  # data N(M, S^2), noise N(0, 1), independent coupling


def gaussian_velocity(x, t):
    """E[x1 - x0 | x_t = x] for x_t = t x1 + (1 - t) x0: Gaussian conditioning gives
    M + Cov(u, x_t) / Var(x_t) * (x - t M), Cov = t S^2 - (1 - t), Var = t^2 S^2 + (1 - t)^2.
    Its flow is x(t) = t M + sqrt(Var) z, so x(1) = M + S x(0) exactly."""
    t = t[:, None]
    return M + (t * S ** 2 - (1 - t)) / (t ** 2 * S ** 2 + (1 - t) ** 2) * (x - t * M)


@functools.lru_cache(maxsize=None)
def _error(method, num_steps, shift=0.0, **tol):
    z = jnp.linspace(-2.0, 2.0, 9)[:, None]
    x1 = sampling.ode_sample(gaussian_velocity, z, num_steps, method, shift, **tol)
    return float(jnp.abs(x1 - (M + S * z)).max())


def test_euler_first_order_heun_second_order():
    euler = [_error("euler", n) for n in (17, 33, 65)]
    heun = [_error("heun", n) for n in (17, 33, 65)]
    for a, b in zip(euler, euler[1:]):
        assert 1.8 < a / b < 2.2, euler  # halving the step halves the error
    for a, b in zip(heun, heun[1:]):
        assert 3.4 < a / b < 4.4, heun  # ... and quarters Heun's
    assert heun[0] < euler[-1] / 10
    assert _error("euler", 250, 0.3) < 2e-2 and _error("heun", 65, 0.3) < 1e-3  # shifted grids converge too


def test_dopri5_reaches_tolerance():
    # The official tolerances (scipy's RK45 and torchdiffeq's dopri5 also land at 3e-2 to 4e-2 here).
    assert _error("dopri5", 2, atol=1e-6, rtol=1e-3) < 5e-2
    assert _error("dopri5", 2, atol=1e-7, rtol=1e-6) < 2e-5
    with pytest.raises(ValueError, match="unknown ODE method"):
        _error("rk4", 5)


# ------------------------------------------------------------------------------------------
# Classifier-free guidance.
# ------------------------------------------------------------------------------------------
NULL = 10


def toy_model(x, t, y):
    return x * (1.0 + y[:, None]) + t[:, None] ** 2


def test_guidance():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3)), jnp.float32)
    y = jnp.array([1, 4])
    cond = toy_model(x, jnp.array([0.1, 0.5]), y)
    uncond = toy_model(x, jnp.array([0.1, 0.5]), jnp.full((2,), NULL))
    t = jnp.array([0.1, 0.5])
    np.testing.assert_array_equal(sampling.guided_velocity(toy_model, x, t, y, NULL, 1.0, 0.3), cond)
    # Below cfg_interval_start (the noisy end) the conditional velocity, above it the guided one.
    for scale in (3.0, jnp.float32(3.0)):
        got = jax.jit(lambda s: sampling.guided_velocity(toy_model, x, t, y, NULL, s, 0.3))(scale)
        np.testing.assert_allclose(got[0], cond[0], rtol=1e-6)
        np.testing.assert_allclose(got[1], uncond[1] + 3.0 * (cond[1] - uncond[1]), rtol=1e-6)
    # A traced scale of 1 is the conditional model too.
    got = jax.jit(lambda s: sampling.guided_velocity(toy_model, x, t, y, NULL, s, 0.0))(jnp.float32(1.0))
    np.testing.assert_allclose(got, cond, rtol=1e-6)
