"""Train-step throughput and MFU per model size, and per-device state memory vs fsdp.

  python benchmarks/train_step.py --sizes demo vtp_s --batch 8 --steps 3
  python benchmarks/train_step.py --sizes --dit XL --dit-batch 32 --dtype bfloat16     # LightningDiT step
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/train_step.py --sizes --memory vtp_l --meshes 1,8,1 1,4,2

MFU = the step's matmul FLOPs (runner.model_flops) / (step time x peak), the peak being the
device table in vtp_jax.train.runner or, on CPU, a float32 matmul measured in the same run.
--memory reports the per-device train state on every fsdp size and compiles (never runs) the step
with the real shapes at a small batch on each --meshes (data,fsdp,tensor) mesh, reporting the
compiled per-device arguments + temporaries.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from common import load_config, record
from vtp_jax import jobs, sharding
from vtp_jax.jobs import pretrain
from vtp_jax.train import aot, runner


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
    tr = jobs.build(c)
    with runner.scope(tr):
        state = tr.init(jax.random.key(0))
        batch_arrays = sharding.global_batch(pretrain.synthetic_batch(tr.config), tr.mesh)
        compiled = tr.step.lower(state, batch_arrays, tr.consts).compile()
        flops = runner.model_flops(tr.step, state, batch_arrays, tr.consts)
        state, m = compiled(state, batch_arrays, tr.consts)
        jax.block_until_ready(m)
        t = time.perf_counter()
        for _ in range(steps):
            state, m = compiled(state, batch_arrays, tr.consts)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t) / steps
    peak = runner.peak_flops(jax.devices())
    data_dt = pipeline_seconds_per_batch(tr.config, steps)
    return (f"{name} ({dtype}, {c.data.image_size}px, B_clip/ssl/rec {c.data.batch_clip}/{c.data.batch_ssl}/"
            f"{c.data.batch_rec}): {batch / dt:.2f} img/s, {dt * 1e3:.0f} ms/step, {flops / 1e9:.1f} GFLOP/step, "
            f"{flops / dt / 1e9:.1f} GFLOP/s achieved / {peak / 1e9:.0f} peak = MFU {flops / dt / peak:.1%}; "
            f"procedural data pipeline (in-process) {1 / data_dt:.2f} batches/s = {dt / data_dt:.2f}x the step's need")


def dit_throughput(size, batch, steps, dtype, latent=(16, 16, 64)):
    """LightningDiT train step (configs/dit_xl_vtp_l.py's recipe at `size`) on synthetic latents."""
    import flax

    from vtp_jax.jobs import dit
    from vtp_jax.models import dit as dit_lib
    from vtp_jax.train import optim

    c = load_config("dit_xl_vtp_l")
    c.dit.size, c.dit.dtype, c.dit.batch_size = size, dtype, batch
    c.train.mesh = (-1, 1, 1)
    model = dit.model_from(c, {"shape": list(latent), "num_classes": 1000})
    mesh = sharding.make_mesh(c.train.mesh)
    tx = optim.make_optimizer(c.optim, jax.eval_shape(lambda: dit_lib.init_params(model, jax.random.key(0))),
                              c.train.steps, depth=0)
    shardings = sharding.logical_shardings(jax.eval_shape(lambda: dit.init_state(model, tx, jax.random.key(0))), mesh)
    rng = np.random.default_rng(0)
    batch_arrays = sharding.global_batch({"latent": rng.standard_normal((batch, *latent), np.float32),
                                          "latent_flip": rng.standard_normal((batch, *latent), np.float32),
                                          "label": rng.integers(0, 1000, batch).astype(np.int32)}, mesh)
    consts = (np.zeros(latent[-1], np.float32), np.ones(latent[-1], np.float32))
    with runner.scope_of(mesh):
        state = jax.jit(lambda: flax.linen.meta.unbox(dit.init_state(model, tx, jax.random.key(0))),
                        out_shardings=shardings)()
        step = jax.jit(dit.make_train_step(c, model, tx), in_shardings=(shardings, None, None),
                       out_shardings=(shardings, None), donate_argnums=0)
        flops = runner.model_flops(step, state, batch_arrays, consts)
        state, m = step(state, batch_arrays, consts)
        jax.block_until_ready(m)
        t = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, batch_arrays, consts)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t) / steps
    peak = runner.peak_flops(jax.devices())
    return (f"LightningDiT-{size} ({dtype}, latents {'x'.join(map(str, latent))}, batch {batch}): {batch / dt:.2f} "
            f"img/s, {dt * 1e3:.0f} ms/step, {flops / 1e9:.1f} GFLOP/step, {flops / dt / 1e9:.1f} GFLOP/s achieved / "
            f"{peak / 1e9:.0f} peak = MFU {flops / dt / peak:.1%}")


def pipeline_seconds_per_batch(config, n):
    """Seconds per batch of the grain pipeline for this config (procedural source, this process)."""
    from vtp_jax.data import pipeline

    d = config.data.copy_and_resolve_references()
    d.source = "procedural"
    it = pipeline.make_train_iterator(d, seed=0, process_index=0, process_count=1)
    next(it)
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    return (time.perf_counter() - t) / n


def encode_decode(name, batch, image):
    """Released-architecture encode and decode throughput (float32, jitted, one device)."""
    from vtp_jax.models.vtp import VTP, init_params

    c = load_config(name).model
    c.head.prototypes, c.text.depth = 0, 0
    params = init_params(c, jax.random.key(0), image)
    model = VTP(c)
    x = jax.numpy.zeros((batch, image, image, 3))
    enc = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VTP.encode))
    z = enc(params, x).block_until_ready()
    dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method=VTP.decode))
    dec(params, z).block_until_ready()
    out = []
    for what, f, arg in (("encode", enc, x), ("decode", dec, z)):
        t = time.perf_counter()
        for _ in range(3):
            f(params, arg).block_until_ready()
        out.append(f"{batch * 3 / (time.perf_counter() - t):.2f} img/s {what}")
    return f"{name} at {image}px, batch {batch}: " + ", ".join(out)


def memory(name, batch, image, compile_meshes=((1, 8, 1),)):
    """Per-device bytes of the train state (params + teacher + AdamW) for each fsdp size, from
    the shardings (no allocation); the step itself is compiled (never run) on each mesh of
    `compile_meshes` (data, fsdp, tensor), with scanned block stacks so that VTP-L compiles in
    minutes rather than the unrolled ~15."""
    def trainer(mesh_shape):
        c = shaped(name, 8 * batch * jax.device_count(), image)  # B_rec = one image per device
        c.model.dtype, c.model.remat, c.model.scan_layers = "bfloat16", "full", True
        return c, jobs.build(c, sharding.make_mesh(mesh_shape))

    lines = []
    for fsdp in (1, 2, 4, 8):
        if jax.device_count() % fsdp:
            continue
        _, tr = trainer((-1, fsdp, 1))
        with runner.scope(tr):
            state = jax.eval_shape(tr.init, jax.random.key(0))
        state_bytes = sum(np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                          for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(tr.shardings)))
        lines.append(f"{name} mesh (data={jax.device_count() // fsdp}, fsdp={fsdp}): state (params + teacher + "
                     f"AdamW) {state_bytes / 2**30:.2f} GiB/device")
    for shape in compile_meshes:
        c, tr = trainer(shape)
        r = aot.compile_step(jobs.get(c.job), c, tr.mesh)  # abstract: nothing allocated or run
        mem = r["memory"]
        lines.append(f"{name} compiled step (XLA:CPU) on mesh (data, fsdp, tensor) = {tuple(shape)} (B_clip / ssl / "
                     f"rec {c.data.batch_clip} / {c.data.batch_ssl} / {c.data.batch_rec}, bf16, remat full, scanned): "
                     f"arguments {mem['arguments'] / 2**30:.2f} GiB + temporaries {mem['temporaries'] / 2**30:.2f} GiB "
                     f"per device (compile {r['compile_seconds']:.0f} s)")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="*", default=["demo"])
    ap.add_argument("--batch", type=int, default=8, help="B_clip (B_ssl = B_clip/4, B_rec = B_clip/8)")
    ap.add_argument("--image", type=int, default=0, help="override the config's image size")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--memory", nargs="*", default=[], help="sizes for per-device memory (state, compiled step)")
    ap.add_argument("--meshes", nargs="*", default=["1,8,1"], help="(data,fsdp,tensor) meshes --memory compiles on")
    ap.add_argument("--encode", nargs="*", default=[], help="sizes for encode / decode throughput")
    ap.add_argument("--dit", nargs="*", default=[], help="LightningDiT sizes (S, B, L, XL, ...) for step MFU")
    ap.add_argument("--dit-batch", type=int, default=8)
    args = ap.parse_args()
    lines = [throughput(s, args.batch, args.steps, args.image, args.dtype) for s in args.sizes]
    lines += [dit_throughput(s, args.dit_batch, args.steps, args.dtype) for s in args.dit]
    for s in args.memory:
        lines += memory(s, 1, args.image, [tuple(map(int, m.split(","))) for m in args.meshes])
    lines += [encode_decode(s, 2, args.image or 256) for s in args.encode]
    record("Train step", lines)


if __name__ == "__main__":
    main()
