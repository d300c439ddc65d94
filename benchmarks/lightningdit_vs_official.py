"""LightningDiT: vtp_jax.load_lightningdit vs the official model and transport sampler, numerics and CPU speed.

Needs, besides this package, `pip install torch timm torchdiffeq` and a checkout of the official
LightningDiT (https://github.com/hustvl/LightningDiT, or the fork VTP uses; its `models/` and
`transport/` are imported from --official, nothing of it is copied here):

  python benchmarks/lightningdit_vs_official.py --official /path/to/LightningDiT --rounds 5 --cores 1

In one process it builds the official `models.lightningdit.LightningDiT` with the shipped options
(SwiGLU, RMSNorm, RoPE) at a small size, puts random values in every learned tensor (pos_embed
stays the fixed sin-cos buffer), saves {"model", "ema", "config"} like the official training script
(distinct random "model" weights; "ema" is what inference uses) and loads that .pt file with
`vtp_jax.load_lightningdit`. Then:
  (a) max |ours - ref| / max |ref| of the velocity at t spread over [0, 1] (the last label being
      the null class), and of the samples of the official `transport.Sampler.sample_ode` (Euler,
      Heun = torchdiffeq "heun2", adaptive dopri5 at atol 1e-6, rtol 1e-3) vs `PretrainedDiT.sample`
      from the same noise and labels; both dopri5 results are also compared with a tight-tolerance
      solution (ours at atol 1e-9, rtol 1e-8), the step-size controllers differing;
  (b) alternating A B A B timing of one velocity call: ours jitted (compiled before timing) vs the
      official model under torch.no_grad(), each measurement the mean of --calls calls; medians of
      --rounds rounds and the ratio ours / reference. The official @torch.compile decorators are
      disabled (TORCHDYNAMO_DISABLE=1): the official side runs eagerly. --cores N pins the whole
      process to N cores (torch's OpenMP threads suffer badly when other jobs share the cores).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # before torch is imported: eager official model

import jax
import numpy as np

from common import record
import vtp_jax

# The released configurations' options (LightningDiT-XL/1 of VA-VAE and VTP).
SHIPPED = dict(class_dropout_prob=0.1, num_classes=1000, use_swiglu=True, use_rmsnorm=True, use_rope=True,
               use_qknorm=False, wo_shift=False, learn_sigma=False)


def randomize(model, seed: int) -> dict:
    """Random values in every learned tensor of the official model; returns a copy of its state dict."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":  # a frozen sin-cos buffer held as a Parameter
                continue
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2 and "embedding_table" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return {k: v.clone() for k, v in model.state_dict().items()}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True, help="a LightningDiT checkout (holds models/ and transport/)")
    ap.add_argument("--input-size", type=int, default=8, help="latent height = width")
    ap.add_argument("--patch", type=int, default=2)
    ap.add_argument("--channels", type=int, default=4, help="latent channels")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="the official num_steps: ODE grid points (Euler / Heun take "
                    "num_steps - 1 steps; dopri5 is adaptive and reports at these points)")
    ap.add_argument("--shift", type=float, default=0.3, help="official timestep_shift (<= 0: none)")
    ap.add_argument("--rounds", type=int, default=5, help="A B rounds of the timing (after 2 warm-up rounds)")
    ap.add_argument("--calls", type=int, default=10, help="velocity calls per timed measurement")
    ap.add_argument("--cores", type=int, default=0, help="pin the process (both frameworks) to the first N cores "
                    "this process may use; torch gets one thread per core (default: all of them)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if args.cores:  # before XLA's and torch's thread pools exist: they inherit it and size by it
        cores = cores[: args.cores]
        os.sched_setaffinity(0, cores)

    sys.path.insert(0, os.path.abspath(args.official))
    import torch
    from models.lightningdit import LightningDiT
    from transport import Sampler, create_transport

    torch.set_num_threads(len(cores))
    torch.manual_seed(args.seed)
    kw = {**SHIPPED, "input_size": args.input_size, "patch_size": args.patch, "in_channels": args.channels,
          "hidden_size": args.hidden, "depth": args.depth, "num_heads": args.heads}
    official = LightningDiT(**kw).eval()
    sd_model = randomize(official, args.seed + 1)
    sd_ema = randomize(official, args.seed + 2)  # left in `official`: the weights compared
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lightningdit_random.pt")
        torch.save({"model": sd_model, "ema": sd_ema, "config": {"model": kw}}, path)
        ours = vtp_jax.load_lightningdit(path, num_heads=args.heads)

    b, c, s = args.batch, args.channels, args.input_size
    g = torch.Generator().manual_seed(args.seed + 3)
    x = torch.randn(b, c, s, s, generator=g)
    t = torch.linspace(0, 1, b)
    y = torch.randint(0, kw["num_classes"], (b,), generator=g)
    y[-1] = kw["num_classes"]  # the null (unconditional) class
    nhwc = lambda a: a.permute(0, 2, 3, 1).numpy()  # noqa: E731
    with torch.no_grad():
        v_ref = nhwc(official(x, t, y))
    v_ours = ours.velocity(nhwc(x), t.numpy(), y.numpy())
    lines = [f"process on {len(cores)} core(s): official LightningDiT (torch {torch.__version__}, {len(cores)} "
             f"thread(s), eager) vs "
             f"vtp_jax.load_lightningdit (jax {jax.__version__}, jitted); random weights, float32; "
             f"{args.input_size}x{args.input_size}x{c} latents, patch {args.patch}, width {args.hidden}, depth "
             f"{args.depth}, {args.heads} heads, SwiGLU + RMSNorm + RoPE, batch {b}",
             f"velocity (t = {', '.join(f'{v:.2f}' for v in t.tolist())}) max |ours - ref| / max |ref|: "
             f"{rel(v_ours, v_ref):.2e} (max |ref| {np.abs(v_ref).max():.3g})"]

    z = torch.randn(b, c, s, s, generator=g)
    yc = torch.randint(0, kw["num_classes"], (b,), generator=g)
    sampler = Sampler(create_transport("Linear", "velocity", None, None, None))
    samples, atol, rtol = [], 1e-6, 1e-3
    for official_name, our_name in (("euler", "euler"), ("heun2", "heun"), ("dopri5", "dopri5")):
        solve = sampler.sample_ode(sampling_method=official_name, num_steps=args.steps, atol=atol, rtol=rtol,
                                   reverse=False, timestep_shift=args.shift)
        with torch.no_grad():
            ref = nhwc(solve(z, official.forward, y=yc)[-1])
        got = np.asarray(ours.sample(nhwc(z), yc.numpy(), num_steps=args.steps, shift=args.shift, method=our_name,
                                     atol=atol, rtol=rtol))
        samples.append(f"{our_name} {rel(got, ref):.2e}")
        if our_name == "dopri5":
            tight = np.asarray(ours.sample(nhwc(z), yc.numpy(), num_steps=args.steps, shift=args.shift,
                                           method="dopri5", atol=1e-9, rtol=1e-8))
            dopri = f"dopri5 (atol {atol:g}, rtol {rtol:g}) vs a tight solution (ours at atol 1e-9, rtol 1e-8): " \
                    f"official {rel(ref, tight):.2e}, ours {rel(got, tight):.2e}"
    lines.append(f"samples ({args.steps} grid points, shift {args.shift}) max |ours - ref| / max |ref|: "
                 + ", ".join(samples))
    lines.append(dopri)

    xs, ts, ys = nhwc(x), t.numpy(), y.numpy()

    def time_ours() -> float:
        start = time.perf_counter()
        for _ in range(args.calls):
            out = ours.velocity(xs, ts, ys)
        out.block_until_ready()
        return (time.perf_counter() - start) / args.calls

    def time_ref() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(args.calls):
                official(x, t, y)
            return (time.perf_counter() - start) / args.calls

    for _ in range(2):  # compiles ours; warms both
        time_ours(), time_ref()
    rows = np.array([(time_ours(), time_ref()) for _ in range(args.rounds)])
    mine, theirs = np.median(rows, axis=0)
    lines.append(f"CPU time of one velocity call (batch {b}), alternating ours / official over {args.rounds} "
                 f"rounds of {args.calls} calls: median ours {mine * 1e3:.2f} ms, official {theirs * 1e3:.2f} ms; "
                 f"ratio of medians ours/ref {mine / theirs:.2f}, median per-round ratio "
                 f"{np.median(rows[:, 0] / rows[:, 1]):.2f}")
    record("LightningDiT vs the official code", lines)


if __name__ == "__main__":
    main()
