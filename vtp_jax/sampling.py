"""ODE sampling of a rectified-flow velocity model, on LightningDiT's time grid.

The ODE dx/dt = v(x, t) runs from noise (t = 0) to data (t = 1). As the official sampler
(transport/integrators.py, torchdiffeq on a fixed grid), `num_steps` counts GRID POINTS:
linspace(0, 1, num_steps) then the time shift, so 250 means 249 Euler steps. Everything here is
jittable; num_steps, method and shift are static (the grid is built on the host).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["time_shift", "grid", "ode_sample", "guided_velocity"]


def time_shift(t, shift: float):
    """t' = s t / (1 + (s - 1) t) (0 -> 0, 1 -> 1); s < 1 spends more of the grid near the noise.

    As the official `timestep_shift`, s <= 0 means no shift (its default is 0), and s = 1 is the
    identity too.
    """
    if shift <= 0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def grid(num_steps: int, shift: float = 0.0) -> np.ndarray:
    """The (num_steps,) float32 time points: linspace(0, 1, num_steps), shifted.

    Rounded as the official grid is (torch.linspace's float32 step, each point computed from
    the nearer end), so the two grids are equal bit for bit.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps counts grid points (250 = 249 steps) and must be >= 2, got {num_steps}")
    step = np.float64(np.float32(1.0) / np.float32(num_steps - 1))
    i = np.arange(num_steps)
    t = np.where(i < num_steps // 2, i * step, 1.0 - (num_steps - 1 - i) * step).astype(np.float32)
    return np.asarray(time_shift(t, float(shift)), np.float32)


def ode_sample(velocity_fn: Callable, noise, num_steps: int, method: str = "euler", shift: float = 0.0,
               atol: float = 1e-6, rtol: float = 1e-3):
    """x(1) from x(0) = noise under dx/dt = velocity_fn(x, t), t a (B,) vector.

    "euler": one step per grid interval. "heun": Heun's second-order method (torchdiffeq's
    `heun2`, the official fixed-grid second-order choice), a full Heun step on every interval,
    the last one included (the velocity is finite at t = 1). "dopri5": adaptive Dormand-Prince
    (diffrax) with the official atol / rtol defaults; only the grid's end points matter to it
    (torchdiffeq, too, steps freely and only interpolates onto the grid).
    """
    ts = grid(num_steps, shift)
    batch = noise.shape[0]
    v = lambda x, t: velocity_fn(x, jnp.full((batch,), t, jnp.float32))  # noqa: E731

    if method == "euler":
        def step(x, tt):
            t0, t1 = tt[0], tt[1]
            return x + (t1 - t0) * v(x, t0), None
    elif method == "heun":
        def step(x, tt):
            t0, t1 = tt[0], tt[1]
            k1 = v(x, t0)
            k2 = v(x + (t1 - t0) * k1, t1)
            return x + 0.5 * (t1 - t0) * (k1 + k2), None
    elif method == "dopri5":
        import diffrax  # here: importing it costs seconds that only the adaptive solver needs

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, x, args: v(x, t)), diffrax.Dopri5(), t0=float(ts[0]), t1=float(ts[-1]),
            dt0=None, y0=noise, stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            saveat=diffrax.SaveAt(t1=True), max_steps=16384)
        return sol.ys[0]
    else:
        raise ValueError(f"unknown ODE method {method!r}: expected 'euler', 'heun' or 'dopri5'")
    pairs = jnp.stack([ts[:-1], ts[1:]], axis=1)
    x, _ = jax.lax.scan(step, noise, pairs)
    return x


def guided_velocity(velocity_fn: Callable, x, t, y, null_class: int, cfg_scale, cfg_interval_start=0.0,
                    cfg_channels: int | None = None):
    """Classifier-free guidance v_u + scale * (v_c - v_u), with one batched model call.

    velocity_fn(x, t, y) is the model; unconditional = label `null_class`. Samples whose
    t < cfg_interval_start (the noisy part: t = 0 is noise) get the conditional velocity, as the
    official cfg interval. `cfg_channels` None guides every channel (the standard CFG); k guides
    the first k channels and leaves the others conditional, as the official forward_with_cfg does
    with k = 3 (a DiT leftover for 4-channel SD latents, kept there "for exact reproducibility"):
    the setting that reproduces samples of official CFG runs.
    """
    if cfg_channels is not None and cfg_channels < 1:
        raise ValueError(f"cfg_channels={cfg_channels}: None (all channels) or the number of leading channels guided")
    if isinstance(cfg_scale, (int, float)) and cfg_scale == 1.0:
        return velocity_fn(x, t, y)
    b = x.shape[0]
    both = velocity_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                       jnp.concatenate([y, jnp.full_like(y, null_class)]))
    cond, uncond = both[:b], both[b:]
    guided = uncond + cfg_scale * (cond - uncond)
    if cfg_channels is not None and cfg_channels < x.shape[-1]:  # channels last
        guided = jnp.concatenate([guided[..., :cfg_channels], cond[..., cfg_channels:]], axis=-1)
    on = jnp.reshape(t >= cfg_interval_start, (-1,) + (1,) * (x.ndim - 1))
    return jnp.where(on, guided, cond)
