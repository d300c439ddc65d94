"""Train-step throughput and MFU per model size, and per-device state memory vs fsdp.

  python benchmarks/train_step.py --sizes demo vtp_s --batch 8 --steps 3
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/train_step.py --memory vtp_l

MFU = XLA cost-analysis FLOPs of the compiled step / (step time x peak), the peak being the
device table in vtp_jax.train.loop or, on CPU, a float32 matmul measured in the same run.
--memory compiles (never runs) the step with the real shapes at a small batch on every fsdp size
and reports compiled per-device memory of params + optimizer state + temporaries.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from common import load_config, record
from vtp_jax.train import loop, pretrain, sharding


def shaped(name: str, batch: int, image: int | None):
    c = load_config(name)
    c.objectives.lpips_weight = 0.0  # LPIPS weights are files users bring; VGG cost is excluded
    d = c.data
    if image:
        d.image_size = image
        d.global_crops_size = image
        d.local_crops_size = max(c.model.patch_size, image * 7 // 16 // c.model.patch_size * c.model.patch_size)
    d.batch_clip, d.batch_ssl, d.batch_rec = batch, max(batch // 4, 1), max(batch // 8, 1)
    return c


def throughput(name, batch, steps, image, dtype):
    c = shaped(name, batch, image)
    c.model.dtype = dtype
    n = sharding.batch_size_of(sharding.make_mesh(c.train.mesh))
    c.data.batch_ssl, c.data.batch_rec = max(c.data.batch_ssl, n), max(c.data.batch_rec, n)
    tr = loop.build(c)
    with loop.scope(tr):
        state = tr.init(jax.random.key(0))
        batch_arrays = sharding.global_batch(pretrain.synthetic_batch(tr.config), tr.mesh)
        compiled = tr.step.lower(state, batch_arrays, tr.lpips_params).compile()
        flops = loop.compiled_flops(compiled) * jax.device_count()
        state, m = compiled(state, batch_arrays, tr.lpips_params)
        jax.block_until_ready(m)
        t = time.perf_counter()
        for _ in range(steps):
            state, m = compiled(state, batch_arrays, tr.lpips_params)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t) / steps
    peak = loop.peak_flops(jax.devices())
    return (f"{name} ({dtype}, {c.data.image_size}px, B_clip/ssl/rec {c.data.batch_clip}/{c.data.batch_ssl}/"
            f"{c.data.batch_rec}): {batch / dt:.2f} img/s, {dt * 1e3:.0f} ms/step, {flops / 1e9:.1f} GFLOP/step, "
            f"{flops / dt / 1e9:.1f} GFLOP/s achieved / {peak / 1e9:.0f} peak = MFU {flops / dt / peak:.1%}")


def memory(name, batch, image):
    lines = []
    for fsdp in (1, 2, 4, 8):
        if jax.device_count() % fsdp:
            continue
        c = shaped(name, 8 * batch * jax.device_count(), image)  # B_rec = one image per device
        c.model.dtype, c.model.remat = "bfloat16", "full"
        tr = loop.build(c, sharding.make_mesh((-1, fsdp, 1)))
        with loop.scope(tr):
            state = jax.eval_shape(tr.init, jax.random.key(0))
            spec = pretrain.batch_spec(tr.config)
            batch_sds = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(
                tr.mesh, len(v.shape), sharding.batch_axis(k))) for k, v in spec.items()}
            t = time.perf_counter()
            mem = tr.step.lower(state, batch_sds, tr.lpips_params).compile().memory_analysis()
        state_bytes = sum(np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                          for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(tr.shardings)))
        lines.append(f"{name} mesh (data={jax.device_count() // fsdp}, fsdp={fsdp}): state (params + teacher + "
                     f"AdamW) {state_bytes / 2**30:.2f} GiB/device, compiled args {mem.argument_size_in_bytes / 2**30:.2f} "
                     f"GiB + temps {mem.temp_size_in_bytes / 2**30:.2f} GiB/device (compile {time.perf_counter() - t:.0f}s)")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="*", default=["demo"])
    ap.add_argument("--batch", type=int, default=8, help="B_clip (B_ssl = B_clip/4, B_rec = B_clip/8)")
    ap.add_argument("--image", type=int, default=0, help="override the config's image size")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--memory", nargs="*", default=[], help="sizes to compile-only on every fsdp size")
    args = ap.parse_args()
    lines = [throughput(s, args.batch, args.steps, args.image, args.dtype) for s in args.sizes]
    for s in args.memory:
        lines += memory(s, 1, args.image)
    record("Train step", lines)


if __name__ == "__main__":
    main()
