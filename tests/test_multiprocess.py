"""Multi-host on one machine: two processes (jax.distributed, gloo CPU collectives, 2 devices
each) started by launch/local_multiprocess.sh train 3 steps with per-process data sharding; the
result equals one process with 4 devices fed the same global batches, and the checkpoint the two
processes wrote restores in this single process."""
import os
import re
import subprocess

import jax
import numpy as np

import tiny
from vtp_jax import config as config_lib
from vtp_jax import jobs, sharding
from vtp_jax.data import pipeline
from vtp_jax.train import runner

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 3


def reference(config, n_processes=2):
    """One process, 4 devices, each global batch = the processes' local batches concatenated."""
    tr = jobs.build(config, sharding.make_mesh((4, 1, 1)))
    views = [k for k, on in config_lib.active(config).items() if on]
    iters = [pipeline.make_train_iterator(tr.config.data, seed=config.seed, process_index=i,
                                          process_count=n_processes, views=views) for i in range(n_processes)]
    losses = []
    with runner.scope(tr):
        state = tr.init(jax.random.key(config.seed))
        for _ in range(STEPS):
            parts = [next(it) for it in iters]
            batch = {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
            state, m = tr.step(state, sharding.global_batch(batch, tr.mesh), tr.consts)
            losses.append(float(m["loss"]))
    return jax.device_get(state.params), losses


def test_two_processes_match_one(tmp_path):
    workdir = tmp_path / "mp"
    env = dict(os.environ, PORT=str(20000 + os.getpid() % 20000), DEVICES_PER_PROCESS="2")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    proc = subprocess.run(
        ["bash", os.path.join(HERE, "..", "launch", "local_multiprocess.sh"), "2", f"--config={HERE}/tiny.py",
         f"--workdir={workdir}", f"--config.train.steps={STEPS}", f"--config.train.checkpoint_every={STEPS}",
         "--config.train.images_every=0", "--config.train.dcn_mesh=(2,1,1)"],  # hosts joined as slices
        env=env, capture_output=True, text=True, timeout=900)
    logs = {i: (workdir / "logs" / f"process_{i}.log").read_text() for i in range(2)}
    assert proc.returncode == 0, proc.stdout + logs[0][-3000:] + logs[1][-3000:]
    assert "process 1 of 2, 4 devices (2 local)" in logs[1]
    assert len(re.findall(r"step \d+/\d+: loss", logs[0])) == STEPS

    config = tiny.get_config()
    config.train.steps = STEPS  # the schedules depend on the run length
    params, losses = reference(config)
    logged = [float(x) for x in re.findall(r"step \d+/\d+: loss ([-\d.e+]+)", logs[0])]
    np.testing.assert_allclose(logged, losses, rtol=1e-4)  # the log line prints 6 digits
    # Process 0 held the workdir lock and released it; it wrote the checksums both processes agreed on.
    assert not (workdir / "LOCK").exists()
    assert (workdir / "checkpoints" / str(STEPS) / "integrity" / "metadata").is_file()
    restored = tiny.restore_params(workdir, STEPS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), restored, params)
