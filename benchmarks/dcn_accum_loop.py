"""Why two v5e-256 slices held more per chip at accum_steps 2 than at 1 (VTP-L: 19.67 against
16.72 GiB): the same step at small scale, compiled by the TPU compiler (compile-only devices) on
one slice and on two, at k = 1 and 2, and at k = 2 with XLA's collective pipeliner off.

  JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python benchmarks/dcn_accum_loop.py

The step: tests/tiny.py as a plain autoencoder in bf16 at 128 px, batch 1,024, mesh (2, 4, 1) on
8 chips (v5e:2x4, or 2 x v5e:2x2 with dcn_mesh (2, 1, 1)). Each compile is a fresh process, as
LIBTPU_INIT_ARGS is read once when libtpu loads. Memory per chip and the trip counts of the
compiled program's while loops (no 2 among them: the accumulation loop was unrolled).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_PIPELINER = "--xla_tpu_enable_collective_pipeliner=false"
CASES = [("v5e-8", 1, 1, ""), ("v5e-8", 1, 2, ""), ("v5e-4", 2, 1, ""), ("v5e-4", 2, 2, ""),
         ("v5e-4", 2, 2, NO_PIPELINER)]


def one(topology: str, slices: int, k: int) -> dict:
    sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]
    import tiny
    from vtp_jax import jobs
    from vtp_jax.train import aot, runner

    c = tiny.autoencoder_config(image_size=128)
    c.train.update(mesh=(2, 4, 1), accum_steps=k)
    if slices > 1:
        c.train.update(compile_slices=slices, dcn_mesh=(slices, 1, 1))
    r = aot.compile_step(jobs.get("pretrain"), c, runner.make_mesh(c, aot.topology_devices(topology, slices)))
    return dict(memory=r["memory"], loops=r["loops"], seconds=r["compile_seconds"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--one", nargs=3)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    from common import record

    lines = []
    for topology, slices, k, flags in CASES:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "LIBTPU_INIT_ARGS": flags}
        out = subprocess.run([sys.executable, __file__, "--one", topology, str(slices), str(k)], env=env,
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        m = {n: v / 2**20 for n, v in r["memory"].items()}
        lines.append(f"{topology} x {slices} slice(s), accum_steps {k}{', ' + flags if flags else ''}: "
                     f"{m['arguments']:.0f} + {m['temporaries']:.0f} + {m['program']:.0f} = {m['total']:.0f} MiB "
                     f"per chip; while loops {r['loops']}; compiled in {r['seconds']:.0f} s")
    record("The accumulation loop on two slices: TPU compiler, compile-only devices", lines)


if __name__ == "__main__":
    main()
