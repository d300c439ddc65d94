"""Multi-host on one machine: two processes (jax.distributed, gloo CPU collectives, 2 devices
each) started by launch/local_multiprocess.sh train 3 steps with per-process data sharding; the
result equals one process with 4 devices fed the same global batches, and the checkpoint the two
processes wrote restores in this single process. The sample job on two "hosts" with their own
local disks (a workdir each): process 0's workdir decides what is done and whether the settings
match, whatever process 1's disk holds."""
import filecmp
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

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


# ------------------------------------------------------------------------------------------------
# The sample job: process 0 decides.
# ------------------------------------------------------------------------------------------------
N, PART = 128, 32  # 4 parts of one global batch of 32 (8 per device on 4 devices)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """(sample-job flags, the single-process reference workdir): a tiny DiT trained 2 steps,
    sampled by one process on a 4-device mesh (the two processes' mesh, the same per-device batch)."""
    tokenizer = tiny.export_tokenizer(tmp_path_factory.mktemp("tokenizer"), 16, text=False)
    c = tiny.dit_config(tokenizer, 16, num_train_images=16, stats_samples=16, steps=2)
    c.dit.sample.update(num_steps=3, every=0)
    dit_workdir = str(tmp_path_factory.mktemp("dit"))
    jobs.run(c, dit_workdir)
    fields = dict(checkpoint=dit_workdir, num_samples=N, batch_size=PART, part_size=PART, preview=4)
    c = tiny.load_config("sample")
    c.sample.update(fields)
    c.train.mesh = (4, 1, 1)
    reference = tmp_path_factory.mktemp("reference")
    jobs.run(c, str(reference))
    flags = [f"--config={os.path.join(HERE, '..', 'configs', 'sample.py')}", "--config.train.mesh=(4,1,1)"]
    return flags + [f"--config.sample.{k}={v}" for k, v in fields.items()], reference


def _two_processes(flags, workdirs, logs, timeout=300):
    """vtp_jax.main as processes 0 and 1 (2 CPU devices each), process i on workdirs[i]:
    (exit codes, logs). A process still running after `timeout` s is killed (exit code None)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join([f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
                                + ["--xla_force_host_platform_device_count=2"])
    procs = [subprocess.Popen([sys.executable, "-m", "vtp_jax.main", *flags, f"--workdir={w}",
                               f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                              env=env, stdout=open(logs / f"process_{i}.log", "w"), stderr=subprocess.STDOUT)
             for i, w in enumerate(workdirs)]
    deadline, codes = time.time() + timeout, []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return codes, [(logs / f"process_{i}.log").read_text() for i in range(2)]


def _files(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


def test_two_process_sample_job_follows_process_0s_workdir(sampled, tmp_path):
    """Process 0's disk holds parts 0 and 2 of the reference; process 1's holds part 0 with other
    settings. The run makes parts 1 and 3 only and samples.npz equals the reference; process 1's
    disk is neither read nor written."""
    flags, reference = sampled
    mine, theirs = tmp_path / "host0", tmp_path / "host1"
    shutil.copytree(reference, mine)
    for name in ("samples.npz", "samples.png", "parts/part-00001.npz", "parts/part-00003.npz"):
        os.remove(mine / name)
    kept = {k: os.stat(mine / "parts" / f"part-0000{k}.npz").st_mtime_ns for k in (0, 2)}
    (theirs / "parts").mkdir(parents=True)
    settings = json.loads((reference / "parts" / "settings.json").read_text())
    (theirs / "parts" / "settings.json").write_text(json.dumps({**settings, "num_steps": 9}))
    shutil.copy(reference / "parts" / "part-00000.npz", theirs / "parts" / "part-00000.npz")
    before = {f: (theirs / f).read_bytes() for f in _files(theirs)}

    codes, logs = _two_processes(flags, [mine, theirs], tmp_path)
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert f"in 4 part(s) of {PART}, 2 already in {mine}/parts" in logs[0]
    assert [int(k) for k in re.findall(r"sample: part (\d) of 4 written", logs[0])] == [2, 4]
    assert filecmp.cmp(mine / "samples.npz", reference / "samples.npz", shallow=False), "not the reference samples"
    assert {k: os.stat(mine / "parts" / f"part-0000{k}.npz").st_mtime_ns for k in (0, 2)} == kept
    assert {f: (theirs / f).read_bytes() for f in _files(theirs)} == before


def test_two_process_sample_job_stops_on_process_0s_settings(sampled, tmp_path):
    """Process 0's disk holds parts made with num_steps=3, this run asks for 4; process 1's disk is
    empty. Both processes stop with the settings error (process 1 pointing at process 0's log)
    instead of process 1 sampling alone into a hang; nothing is written."""
    flags, reference = sampled
    mine, theirs = tmp_path / "host0", tmp_path / "host1"
    shutil.copytree(reference, mine)
    os.remove(mine / "samples.npz")
    theirs.mkdir()
    before = {f: os.stat(mine / f).st_mtime_ns for f in _files(mine)}

    codes, logs = _two_processes(flags + ["--config.sample.num_steps=4"], [mine, theirs], tmp_path)
    assert codes[0] == 1 and codes[1] == 1, (codes, logs[0][-3000:] + logs[1][-3000:])
    said = (f"{mine}/parts holds samples made with other settings (%s): sample into another workdir, or delete "
            "that folder")
    assert "error: " + said % "num_steps: 3 -> 4" in logs[0], logs[0][-3000:]
    assert "error: " + said.replace(str(mine), str(theirs)) % "see the log of process 0" in logs[1], logs[1][-3000:]
    assert {f: os.stat(mine / f).st_mtime_ns for f in _files(mine)} == before and _files(theirs) == []
