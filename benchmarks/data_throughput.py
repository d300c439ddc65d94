"""Input-pipeline throughput: records/s for decode + CLIP view + DINOv2 multi-crop + iBOT masks
+ reconstruction view at 256 px, with B_ssl / B_clip = 1/4 and B_rec / B_clip = 1/8 (VTP's ratios).

  python benchmarks/data_throughput.py --records 512 --batch 64 --workers 0 2

Records are JPEG procedural scenes at --source_size px written once by `prepare` to --cache (a
re-run reuses them), so the timing covers exactly what training does: ArrayRecord read, decode,
views. workers 0 runs everything in this process with one decode thread ("per worker" figure);
workers > 0 adds grain mp_prefetch processes, each with one decode thread.

--demand SIZE sets this against what an accelerator host would consume training SIZE: the step's
matmul FLOPs per CLIP record (runner.model_flops, traced at a small batch with VTP's batch ratios) turned into records/s per host at --mfu of --peak on --devices-per-host
devices, and the decode workers that feed twice that at the per-worker rate measured here. It is
batch-free: at a fixed MFU a device consumes peak x MFU / (FLOPs per record) whatever its batch.

  python benchmarks/data_throughput.py --records 256 --workers 0 --demand vtp_l
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import jax
from train_step import shaped

from common import record
from vtp_jax import config as config_lib
from vtp_jax import jobs
from vtp_jax.data import pipeline, prepare
from vtp_jax.jobs import pretrain
from vtp_jax.train import runner


def config(paths: str, batch: int, workers: int):
    c = config_lib.data_config()  # 256 px CLIP / rec views, 256 / 112 crops, 8 local crops: the VTP defaults
    c.source, c.paths = "array_record", paths
    c.batch_clip, c.batch_ssl, c.batch_rec = batch, batch // 4, batch // 8
    c.num_workers, c.read_threads = workers, 1
    return c


def measure(c, steps: int, warmup: int) -> float:
    """Records (CLIP pairs) per second over `steps` batches after `warmup` batches."""
    it = pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1)
    try:
        for _ in range(warmup):
            next(it)
        start = time.perf_counter()
        for _ in range(steps):
            next(it)
        return steps * c.batch_clip / (time.perf_counter() - start)
    finally:
        it.close()


def flops_per_record(size: str, batch: int = 8) -> float:
    """Train-step FLOPs per CLIP record of config `size` (one device, compiled at B_clip=batch)."""
    c = shaped(size, batch, None)
    c.model.dtype, c.model.remat, c.model.scan_layers = "bfloat16", "full", True
    c.train.mesh = (1, 1, 1)
    tr = jobs.build(c)
    spec = pretrain.batch_spec(tr.config)
    with runner.scope(tr):
        state = jax.eval_shape(tr.init, jax.random.key(0))
        flops = runner.model_flops(tr.step, state, {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in spec.items()},
                                   tr.consts)
    return flops / batch


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=512)
    p.add_argument("--source_size", type=int, default=384, help="side of the stored JPEGs")
    p.add_argument("--batch", type=int, default=64, help="B_clip per step (B_ssl = B/4, B_rec = B/8)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--demand", default="", help="a config (vtp_l, ...): compare with an accelerator host's need")
    p.add_argument("--peak", type=float, default=989e12, help="device peak FLOP/s (default: H100 SXM bf16 dense)")
    p.add_argument("--mfu", type=float, default=0.5)
    p.add_argument("--devices-per-host", type=int, default=8)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "vtp_data_throughput"))
    args = p.parse_args()
    prepare.main(["procedural", "--num_records", str(args.records), "--image_size", str(args.source_size),
                  "--image_format", "jpeg", "--num_shards", "4", "--output", args.cache])
    lines = [f"load average before timing: {os.getloadavg()[0]:.1f} (other jobs may share these cores)"]
    for workers in args.workers:
        rate = measure(config(os.path.join(args.cache, "*.array_record"), args.batch, workers), args.steps, args.warmup)
        who = "in-process (1 decode thread)" if workers == 0 else f"{workers} mp_prefetch workers"
        lines.append(f"{who}: {rate:.1f} records/s = {rate / args.batch:.2f} steps/s at B_clip={args.batch}, "
                     f"B_ssl={args.batch // 4} (2 x 256 + 8 x 112 crops, masks), B_rec={args.batch // 8}, "
                     f"{args.source_size} px JPEG sources")
        per_worker = rate / max(workers, 1)
    if args.demand:
        per_record = flops_per_record(args.demand)
        need = args.devices_per_host * args.peak * args.mfu / per_record
        lines.append(f"{args.demand} step: {per_record / 1e9:.0f} GFLOP per CLIP record (with its SSL / rec share) -> "
                     f"a host of {args.devices_per_host} devices at {args.peak / 1e12:.0f} TFLOP/s and MFU "
                     f"{args.mfu:.0%} consumes {need:.0f} records/s; feeding 2x that takes "
                     f"{math.ceil(2 * need / per_worker)} decode workers at the {per_worker:.1f} records/s per worker "
                     f"measured last")
    record("Data pipeline throughput (decode + CLIP / SSL / rec views, 256 px)", lines)


if __name__ == "__main__":
    main()
