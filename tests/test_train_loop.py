"""The main job end to end in subprocesses: kill -9, SIGTERM and resume give bit-identical
params; the workdir holds logs, reconstructions and a model load_pretrained opens."""
import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

import tiny
import vtp_jax

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 12


def start(workdir, *flags):
    # Two devices per run (a later device-count flag overrides conftest's 8).
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "vtp_jax.main", f"--config={HERE}/tiny.py", f"--workdir={workdir}",
           f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=2", "--config.train.images_every=6",
           "--config.train.keep_checkpoints=10", *flags]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def checkpoints(workdir):
    return sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/*") if os.path.basename(p).isdigit())


def wait_for_checkpoint(proc, workdir, step, timeout=600):
    t = time.time()
    while step not in checkpoints(workdir):
        assert proc.poll() is None, finish(proc)[1][-3000:]
        assert time.time() - t < timeout
        time.sleep(0.05)


def params_at(workdir, step):
    return tiny.restore_params(workdir, step)


def test_kill9_and_sigterm_resume_bit_identical(tmp_path):
    ref = start(tmp_path / "ref")
    a = start(tmp_path / "a")
    # kill -9 right after the step-2 checkpoint lands: nothing after it survives.
    wait_for_checkpoint(a, tmp_path / "a", 2)
    a.send_signal(signal.SIGKILL)
    a.wait()
    assert max(checkpoints(tmp_path / "a")) < STEPS, "the run finished before it could be killed"
    # Resume; SIGTERM (preemption) after the next checkpoint: it must save and exit 0.
    b = start(tmp_path / "a")
    wait_for_checkpoint(b, tmp_path / "a", 4)
    b.send_signal(signal.SIGTERM)
    code, out = finish(b)
    assert code == 0, out[-3000:]
    assert "preempted: checkpoint at step" in out
    assert "taking over the stale lock of host" in out and f"pid {a.pid}," in out, "kill -9 leaves its lock behind"
    preempted_at = max(checkpoints(tmp_path / "a"))
    assert 4 <= preempted_at < STEPS
    code, out = finish(start(tmp_path / "a"))
    assert code == 0, out[-3000:]
    assert f"restored step {preempted_at}" in out
    code, out = finish(ref)
    assert code == 0, out[-3000:]
    jax.tree.map(np.testing.assert_array_equal, params_at(tmp_path / "a", STEPS), params_at(tmp_path / "ref", STEPS))

    # The workdir: TensorBoard events, reconstructions and a release-format export; no lock left.
    assert not (tmp_path / "ref" / "LOCK").exists() and not (tmp_path / "a" / "LOCK").exists()
    assert glob.glob(f"{tmp_path}/ref/events.out.tfevents.*")
    assert sorted(os.listdir(tmp_path / "ref" / "reconstructions")) == ["0000006.png", "0000012.png"]
    model = vtp_jax.load_pretrained(str(tmp_path / "ref" / "export"))
    final = params_at(tmp_path / "ref", STEPS)
    np.testing.assert_array_equal(model.params["trunk"]["patch_embed"]["kernel"],
                                  final["trunk"]["patch_embed"]["kernel"])
    assert model.encode(np.zeros((1, 16, 16, 3), np.float32)).shape == (1, 2, 2, 8)
