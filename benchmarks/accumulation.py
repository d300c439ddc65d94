"""Gradient accumulation (train.accum_steps = k): what it costs in time and what it saves in memory.

  python benchmarks/accumulation.py --time demo --ks 1 4 --rounds 3 --steps 2
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/accumulation.py \\
      --memory vtp_l --per-device 128 --ks 1 4 16

--time: per-sample step time of each k relative to k = 1 on one device (same batch, alternating
rounds so that a shared machine's load hits every k alike), and the step's matmul FLOPs
(runner.model_flops: the accumulated step adds gradient-free forwards for its cached outputs).
--memory: compiles (never runs) the config's step on a (data 1, fsdp 8) mesh with B_clip =
per-device x devices, B_ssl = B_clip / 4, B_rec = B_clip / 8 (the paper's 16k / 4k / 2k ratios)
and reports compiled.memory_analysis() per device: arguments (state + batch) and temporaries.
LPIPS is in the step (abstract VGG16 weights: nothing is loaded or run).
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from common import load_config, record
from vtp_jax import jobs, sharding
from vtp_jax.jobs import pretrain
from vtp_jax.train import aot, runner


def step_time(name, ks, rounds, steps):
    """Seconds per step for each k (median over alternating rounds) and model FLOPs per step."""
    compiled, flops, batch_size = {}, {}, None
    for k in ks:
        c = load_config(name)
        c.evals = {}
        c.objectives.lpips_weight = 0.0  # LPIPS weights are files users bring
        c.train.accum_steps = k
        tr = jobs.build(c, sharding.make_mesh((1, 1, 1)))
        with runner.scope(tr):
            state = tr.init(jax.random.key(0))
            batch = sharding.global_batch(pretrain.synthetic_batch(tr.config), tr.mesh)
            flops[k] = runner.model_flops(tr.step, state, batch, tr.consts)
            fn = tr.step.lower(state, batch, tr.consts).compile()
            state, m = fn(state, batch, tr.consts)  # warm-up
            jax.block_until_ready(m)
        compiled[k] = (tr, fn, state, batch)
        batch_size = c.data.batch_clip, c.data.batch_ssl, c.data.batch_rec
    times = {k: [] for k in ks}
    for _ in range(rounds):
        for k in ks:
            tr, fn, state, batch = compiled[k]
            with runner.scope(tr):
                t = time.perf_counter()
                for _ in range(steps):
                    state, m = fn(state, batch, tr.consts)
                jax.block_until_ready(m)
                times[k].append((time.perf_counter() - t) / steps)
            compiled[k] = (tr, fn, state, batch)
    med = {k: float(np.median(v)) for k, v in times.items()}
    lines = [f"{name} (float32, one device, B_clip / ssl / rec {'/'.join(map(str, batch_size))}): " + "; ".join(
        f"k={k}: {med[k] * 1e3:.0f} ms/step = {med[k] / batch_size[0] * 1e3:.1f} ms per CLIP sample "
        f"(rounds {', '.join(f'{t * 1e3:.0f}' for t in times[k])} ms), {flops[k] / 1e9:.1f} GFLOP/step" for k in ks)]
    base = ks[0]
    for k in ks[1:]:
        ratios = [a / b for a, b in zip(times[k], times[base])]
        lines.append(f"{name}: per-sample step time k={k} / k={base} = {med[k] / med[base]:.2f} of the medians, "
                     f"{min(times[k]) / min(times[base]):.2f} of the best rounds (per round "
                     f"{', '.join(f'{r:.2f}' for r in ratios)}); matmul FLOPs k={k} / k={base} = "
                     f"{flops[k] / flops[base]:.2f}")
    return lines


def memory(name, per_device, ks, mesh_shape=(1, 8, 1)):
    lines = []
    for k in ks:
        c = load_config(name)
        n = int(np.prod(mesh_shape))
        d = c.data
        d.batch_clip = per_device * n
        d.batch_ssl, d.batch_rec = d.batch_clip // 4, d.batch_clip // 8
        c.objectives.lpips_params = __file__  # any existing file: validation only checks it exists
        c.train.accum_steps = k
        r = aot.compile_step(jobs.get(c.job), c, sharding.make_mesh(mesh_shape))  # abstract: LPIPS as shapes
        mem, m = r["memory"], c.model
        lines.append(
            f"{name} compiled step (XLA:CPU), mesh (data, fsdp, tensor) = {tuple(mesh_shape)}, per device B_clip / ssl "
            f"/ rec {per_device} / {per_device // 4} / {per_device // 8} (global {d.batch_clip} / {d.batch_ssl} / "
            f"{d.batch_rec}), accum_steps {k} (micro-batch per device {per_device // k} / {per_device // 4 // k} / "
            f"{per_device // 8 // k}; {m.dtype}, remat {m.remat}, scan_layers {m.scan_layers}, LPIPS on): temporaries "
            f"{mem['temporaries'] / 2**30:.2f} GiB, arguments {mem['arguments'] / 2**30:.2f} GiB per "
            f"device (compile {r['compile_seconds']:.0f} s)")
        print(lines[-1], flush=True)
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--time", nargs="*", default=[], help="configs for the step-time comparison (one device)")
    ap.add_argument("--memory", nargs="*", default=[], help="configs for compiled memory (8 devices)")
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 4], help="accum_steps values; the first is the base")
    ap.add_argument("--per-device", nargs="+", type=int, default=[128], help="B_clip per device for --memory")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    lines = [f"load average {os.getloadavg()[0]:.1f} at start (the CPU model is in the header)"]
    for name in args.time:
        lines += step_time(name, args.ks, args.rounds, args.steps)
    for name in args.memory:
        for b in args.per_device:
            lines += memory(name, b, args.ks)
    record("Gradient accumulation (train.accum_steps)", lines)


if __name__ == "__main__":
    main()
