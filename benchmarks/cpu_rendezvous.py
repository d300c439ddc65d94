"""The XLA:CPU rendezvous deadlock of the 8-device accumulated step (benchmarks/RESULTS.md).

Runs tests/test_accumulation.py's (data 2, fsdp 4) accumulated pretrain step (accum_steps=4,
both SSL paths) REPS times on 8 fake CPU devices with the test suite's XLA flags, minus those
whose names contain a DROP substring; a run that deadlocks is aborted by XLA's rendezvous after
40 s, naming the collective each device waits in. Run it twice with the same flags: the second
run loads the step from the persistent compilation cache (JAX_COMPILATION_CACHE_DIR).

    WT=. DROP=concurrency_optimized_scheduler REPS=10 python benchmarks/cpu_rendezvous.py
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.environ.get("WT", "."), "tests"))
import conftest  # noqa: E402,F401  the suite's XLA flags and compilation cache

drop = [d for d in os.environ.get("DROP", "").split(",") if d]
os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ["XLA_FLAGS"].split() if not any(d in f for d in drop))
print("XLA_FLAGS", os.environ["XLA_FLAGS"], flush=True)

import jax  # noqa: E402

import test_accumulation as ta  # noqa: E402
from vtp_jax import jobs, sharding  # noqa: E402
from vtp_jax.train import runner  # noqa: E402

for centering, use_bn in (("centering", True), ("sinkhorn_knopp", False)):
    tr = jobs.build(ta.config(4, centering, use_bn), sharding.make_mesh(ta.EIGHT))
    with runner.scope(tr):
        batch = sharding.global_batch(ta.accum_batch(tr.config), tr.mesh)
        for i in range(int(os.environ.get("REPS", "10"))):
            t = time.time()
            _, metrics = tr.step(tr.init(jax.random.key(0)), batch, tr.consts)
            print(f"{centering} bn={use_bn} step {i}: {time.time() - t:.2f} s, loss {float(metrics['loss']):.7f}",
                  flush=True)
print("no deadlock")
