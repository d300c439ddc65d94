"""The first checkpoint save of a replicated state on one process with 8 devices: orbax's
replica-parallel writing (each replicated array sliced per device by a program compiled per
shape) against whole replicas (what vtp_jax.train.checkpointing does with one process).

  python benchmarks/checkpoint_save.py --config demo --rounds 3

Each measurement is a fresh process (a warm jit cache would hide the compiles), alternating the
two modes round by round; it reports the blocking time of the first save and the programs XLA
compiled during it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def one_save(config: str, replica_parallel: bool) -> dict:
    """In this process: builds `config`'s state on a (data 8) mesh, saves it once."""
    import jax

    from common import load_config
    from vtp_jax import jobs, sharding
    from vtp_jax.checkpoints import integrity
    from vtp_jax.train import checkpointing, runner

    c = load_config(config)
    c.evals = {}
    c.objectives.lpips_weight = 0.0
    tr = jobs.build(c, sharding.make_mesh((8, 1, 1)))
    with runner.scope(tr):
        state = tr.init(jax.random.key(0))
    integrity.checksums(state), checkpointing.parameter_scale(state)  # compiled once per run either way
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(secs) if event == BACKEND_COMPILE else None)
    with tempfile.TemporaryDirectory() as d:
        ckpts = checkpointing.Checkpoints(os.path.join(d, "checkpoints"), keep=1)
        if replica_parallel:  # orbax's default, which Checkpoints replaces on one process
            checkpointing.ocp.type_handlers.register_type_handler(
                jax.Array, checkpointing.ocp.type_handlers.ArrayHandler(use_replica_parallel=True), override=True)
        t = time.perf_counter()
        ckpts.save(1, state)
        blocking = time.perf_counter() - t
        ckpts.wait_until_finished()
    return dict(blocking=blocking, compiles=len(compiles), arrays=len(jax.tree.leaves(state)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="demo")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--one", choices=("replica_parallel", "whole"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_save(args.config, args.one == "replica_parallel")))
        return
    os.environ.update(XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
                      JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR="")  # this process and each save's
    runs = {"replica_parallel": [], "whole": []}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for mode in runs:
            out = subprocess.run([sys.executable, __file__, "--config", args.config, "--one", mode],
                                 capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {m: float(np.median([r["blocking"] for r in rs])) for m, rs in runs.items()}
    lines = [f"load average {load:.1f} at start; configs/{args.config}.py's state, {runs['whole'][0]['arrays']} arrays, "
             f"replicated on a (data 8) mesh of host CPU devices; median of {args.rounds} fresh processes each"]
    lines += [f"{m}: first save blocks {med[m]:.2f} s, {runs[m][0]['compiles']} programs compiled during it"
              for m in runs]
    lines.append(f"whole replicas save {med['replica_parallel'] / med['whole']:.1f}x faster")
    from common import record
    record("Saving replicated arrays (one process, 8 devices)", lines)


if __name__ == "__main__":
    main()
