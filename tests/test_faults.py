"""Nothing lost, nothing silently wrong: each fault seen on the demo, reproduced on a tiny run.

One trained workdir (6 steps, a checkpoint every 2) is shared by the module; each test works on a
copy. Runs are in-process (the compiled step comes from the persistent compilation cache after
the first run); only the live competitor of the lock test is a subprocess.
"""
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

import tiny
import vtp_jax
from test_released import RELEASE_CONFIG, release_tensors, write_release
from vtp_jax import jobs, reconstruct
from vtp_jax.checkpoints.released import CheckpointError
from vtp_jax.train import checkpointing, runner

HERE = os.path.dirname(os.path.abspath(__file__))
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT
STEPS = 6


def config(**train):
    c = tiny.get_config()
    c.train.update(steps=STEPS, checkpoint_every=2, keep_checkpoints=10, images_every=0, log_every=2)
    c.train.update(**train)
    return c


def steps_in(workdir):
    return sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/*")
                  if os.path.basename(p).isdigit())


def export_bytes(workdir):
    return (workdir / "export" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module", autouse=True)
def no_mfu():
    """MFU is not under test: skip tracing the step a second time and timing the CPU's peak."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(runner, "model_flops", lambda *a: float("nan"))
        m.setattr(runner, "peak_flops", lambda *a: float("nan"))
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted 6-step run: checkpoints 2, 4, 6 and export/."""
    workdir = tmp_path_factory.mktemp("trained") / "w"
    jobs.run(config(), str(workdir))
    assert steps_in(workdir) == [2, 4, 6]
    return workdir


@pytest.fixture
def workdir(trained, tmp_path):
    """A copy of the trained workdir for one test to damage."""
    dst = tmp_path / "w"
    shutil.copytree(trained, dst)
    return dst


def messages(caplog, level=logging.WARNING):
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


# ------------------------------------------------------------------------------------------------
# The workdir lock.
# ------------------------------------------------------------------------------------------------
def test_second_run_on_a_live_workdir_refuses(workdir, tmp_path):
    log = open(tmp_path / "first.log", "w")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")]))
    first = subprocess.Popen(
        [sys.executable, "-m", "vtp_jax.main", f"--config={HERE}/tiny.py", f"--workdir={workdir}",
         "--config.train.steps=100", "--config.train.images_every=0"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        t = time.time()
        while not (workdir / "LOCK").exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() - t < 300, "the first run never took the lock"
            time.sleep(0.05)
        before = export_bytes(workdir)
        with pytest.raises(checkpointing.WorkdirLocked) as e:
            jobs.run(config(steps=8), str(workdir))
        msg = str(e.value)
        assert "\n" not in msg, msg
        for needle in (str(workdir), f"pid {first.pid}", f"host {socket.gethostname()}", "started", "refusing"):
            assert needle in msg, msg
        assert first.poll() is None, "the refused run must not disturb the live one"
        assert export_bytes(workdir) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        log.close()
    # Killed: its lock stays behind, naming a process that is gone.
    assert json.loads((workdir / "LOCK").read_text())["pid"] == first.pid


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_lock_is_taken_over_live_or_foreign_refused(tmp_path, caplog):
    """Same host, process gone (or its pid reused): taken over with a warning. A live process,
    or one on another host (which this host cannot check): refused."""
    caplog.set_level(logging.WARNING)
    workdir = tmp_path / "w"
    workdir.mkdir()
    host = socket.gethostname()
    lock = workdir / "LOCK"
    nothing = config(steps=0)  # no checkpoints and 0 steps: nothing to do, nothing written
    for holder in (dict(host=host, pid=_dead_pid(), started="earlier"),
                   dict(host=host, pid=os.getpid(), started="earlier", proc_start="1")):  # pid reused
        lock.write_text(json.dumps(holder))
        assert jobs.run(nothing, str(workdir)) == {}
        assert any("taking over the stale lock" in m and f"pid {holder['pid']}" in m for m in messages(caplog))
        assert not lock.exists(), "the run that took the lock over releases it"
        assert not (workdir / "export").exists()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for holder in (dict(host=host, pid=sleeper.pid, started="now"),
                       dict(host="another-host", pid=1, started="now")):
            lock.write_text(json.dumps(holder))
            with pytest.raises(checkpointing.WorkdirLocked, match=f"pid {holder['pid']}"):
                jobs.run(nothing, str(workdir))
            assert json.loads(lock.read_text()) == holder, "a refused run leaves the holder's lock alone"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_verify_retakes_a_lock_deleted_by_hand(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    lock = checkpointing.WorkdirLock(tmp_path / "w")
    with lock:
        mine = json.loads((tmp_path / "w" / "LOCK").read_text())
        (tmp_path / "w" / "LOCK").unlink()
        lock.verify()
        assert lock.held
        again = json.loads((tmp_path / "w" / "LOCK").read_text())
        assert again["token"] == mine["token"] == lock.token and again["pid"] == os.getpid()
        assert messages(caplog) == [f"{tmp_path / 'w' / 'LOCK'} had been deleted while this run held it: taken again"]
        lock.verify()  # holds it: nothing to do
        assert json.loads((tmp_path / "w" / "LOCK").read_text()) == again
    assert not (tmp_path / "w" / "LOCK").exists(), "released on exit"


def test_verify_refuses_when_the_lock_names_another_run(tmp_path):
    workdir = tmp_path / "w"
    other = dict(host="another-host", pid=4321, started="2026-12-07 10:00:00 UTC", token="not-ours")
    lock = checkpointing.WorkdirLock(workdir)
    with lock:
        (workdir / "LOCK").write_text(json.dumps(other))
        with pytest.raises(checkpointing.WorkdirLocked) as e:
            lock.verify()
        assert str(e.value) == (f"workdir lock {workdir / 'LOCK'} now names another run (host another-host, pid 4321, "
                                "started 2026-12-07 10:00:00 UTC): stopping without writing to the workdir")
        assert not lock.held
    assert json.loads((workdir / "LOCK").read_text()) == other, "the other run's lock is left alone"


def test_a_run_whose_lock_was_taken_writes_no_checkpoint(workdir, monkeypatch):
    """The trainer verifies the lock before each checkpoint: taken over after step 6, the run stops
    at its next checkpoint (8) with the lock's message and writes nothing."""
    other = dict(host="another-host", pid=4321, started="now", token="not-ours")
    verify = checkpointing.WorkdirLock.verify

    def taken_then_verify(self):
        self.path.write_text(json.dumps(other))
        verify(self)

    monkeypatch.setattr(checkpointing.WorkdirLock, "verify", taken_then_verify)
    export = export_bytes(workdir)
    with pytest.raises(checkpointing.WorkdirLocked, match="now names another run"):
        jobs.run(config(steps=8), str(workdir))
    assert steps_in(workdir) == [2, 4, 6] and export_bytes(workdir) == export
    assert json.loads((workdir / "LOCK").read_text()) == other


# ------------------------------------------------------------------------------------------------
# Verified checkpoints.
# ------------------------------------------------------------------------------------------------
def _largest_file(step_dir):
    files = [f for f in glob.glob(f"{step_dir}/**", recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def _flip(step_dir):
    """64 bytes overwritten in the middle of the step's largest file."""
    path = _largest_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        block = f.read(64)
        f.seek(-64, 1)
        f.write(bytes(b ^ 0xFF for b in block))


def test_bit_flip_in_latest_checkpoint_falls_back(trained, workdir, caplog):
    caplog.set_level(logging.WARNING)
    _flip(workdir / "checkpoints" / "6")
    jobs.run(config(), str(workdir))
    errors = [m for m in messages(caplog, logging.ERROR) if "checkpoint step 6" in m]
    assert len(errors) == 1 and "checksum mismatch" in errors[0] and "\n" not in errors[0], errors
    assert (workdir / "bad_checkpoints" / "6").is_dir(), "the damaged step is kept aside, not deleted"
    assert steps_in(workdir) == [2, 4, 6]
    assert export_bytes(workdir) == export_bytes(trained), "steps 5-6 redone from step 4 equal the uninterrupted run"


def test_deleted_metadata_and_truncated_data_fall_back(trained, workdir, caplog):
    """Step 6 without its array metadata, step 4 with its largest file cut in half: both named
    in one line each, the run goes on from step 2 and ends where the uninterrupted run did."""
    caplog.set_level(logging.WARNING)
    os.remove(workdir / "checkpoints" / "6" / "state" / "_METADATA")
    path = _largest_file(workdir / "checkpoints" / "4")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    jobs.run(config(), str(workdir))
    errors = messages(caplog, logging.ERROR)
    for step, says in ((6, "state/_METADATA missing"), (4, "array ")):  # the file, or the array it failed on
        mine = [m for m in errors if f"checkpoint step {step} " in m]
        assert len(mine) == 1 and f"cannot be read ({says}" in mine[0] and "\n" not in mine[0], errors
    assert sorted(os.listdir(workdir / "bad_checkpoints")) == ["4", "6"]
    assert export_bytes(workdir) == export_bytes(trained)


def test_no_usable_checkpoint_refuses_instead_of_starting_over(workdir):
    before = export_bytes(workdir)
    for step in (2, 4, 6):
        _flip(workdir / "checkpoints" / str(step))
    with pytest.raises(checkpointing.BadCheckpoints) as e:
        jobs.run(config(), str(workdir))
    assert "\n" not in str(e.value) and all(f"step {s}: checksum mismatch" in str(e.value) for s in (2, 4, 6))
    assert steps_in(workdir) == [2, 4, 6] and not (workdir / "bad_checkpoints").exists()
    assert export_bytes(workdir) == before


def test_restore_into_another_model_names_the_config_fields(workdir):
    for field, value in (("width", 64), ("scan_layers", True)):
        c = config()
        c.model[field] = value
        with pytest.raises(checkpointing.CheckpointMismatch) as e:
            jobs.run(c, str(workdir))
        msg = str(e.value)
        assert f"model.{field}: {tiny.get_config().model[field]!r} then, {value!r} now" in msg, msg
        assert "checkpoint step 6" in msg and "\n" not in msg
    assert steps_in(workdir) == [2, 4, 6] and not (workdir / "bad_checkpoints").exists(), "nothing is damaged"


# ------------------------------------------------------------------------------------------------
# No option destroys results; bad values are config errors before anything compiles.
# ------------------------------------------------------------------------------------------------
def test_steps_at_or_below_the_restored_step_touch_nothing(workdir, caplog):
    caplog.set_level(logging.WARNING)
    files = lambda: {p: os.path.getmtime(p) for p in glob.glob(f"{workdir}/**", recursive=True)  # noqa: E731
                     if os.path.isfile(p)}
    before = files()
    export = export_bytes(workdir)
    for steps in (0, 4):
        assert jobs.run(config(steps=steps), str(workdir)) == {}
        assert any("nothing to do" in m and f"train.steps={steps}" in m for m in messages(caplog))
    assert export_bytes(workdir) == export
    assert files() == before, "no file of the workdir was written"


@pytest.mark.parametrize("field,value", [
    ("train.steps", -5), ("train.keep_checkpoints", 0), ("train.log_every", 0), ("train.checkpoint_every", 0),
    ("train.images_every", -1), ("train.max_nonfinite", 0), ("model.dtype", "bf16"), ("model.remat", "some"),
    ("data.procedural_sizes", ("huge",)),
])
def test_bad_values_are_config_errors_before_compile(workdir, monkeypatch, field, value):
    monkeypatch.setattr(runner, "build", lambda *a, **k: pytest.fail("built (and compiled) despite a bad config"))
    export = export_bytes(workdir)
    c = config()
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(runner.ConfigError) as e:
        jobs.run(c, str(workdir))
    assert f"{field}={value!r}: expected" in str(e.value)
    assert export_bytes(workdir) == export and not (workdir / "LOCK").exists()


def test_all_bad_values_listed_together():
    c = config(steps=-1, log_every=0, checkpoint_every=0, keep_checkpoints=0)
    c.model.dtype = "bf16"
    with pytest.raises(runner.ConfigError) as e:
        jobs.validate(c, 1)
    assert str(e.value).splitlines() == [
        "invalid config:",
        "  train.steps=-1: expected an integer >= 0 (the step the run ends at)",
        "  train.log_every=0: expected an integer >= 1 (steps between metric writes)",
        "  train.checkpoint_every=0: expected an integer >= 1 (steps between checkpoints)",
        "  train.keep_checkpoints=0: expected an integer >= 1 (checkpoints kept; 0 would delete each one right after "
        "writing it)",
        "  model.dtype='bf16': expected one of 'float32', 'bfloat16'",
    ]


def test_divergence_never_replaces_the_healthy_checkpoint(trained, workdir, caplog):
    """lr 1e6 from step 6: the diverging stretches get no checkpoint, the run exits with an error
    and no export; step 6 keeps the healthy parameters the uninterrupted run had."""
    caplog.set_level(logging.WARNING)
    export = export_bytes(workdir)
    c = config(steps=10)
    c.optim.lr = 1e6
    with pytest.raises(FloatingPointError) as e:
        jobs.run(c, str(workdir))
    assert str(e.value) == ("the run ended in a diverging stretch (2 update(s) skipped as non-finite since the last "
                            "checkpoint): step 10 not checkpointed, export/ not written; the newest checkpoint is the "
                            "healthy step 6")
    assert steps_in(workdir) == [2, 4, 6], "no checkpoint of diverged parameters"
    assert any("step 8 not checkpointed" in m for m in messages(caplog)), messages(caplog)
    assert export_bytes(workdir) == export
    healthy = tiny.restore_params(workdir, 6)
    jax.tree.map(np.testing.assert_array_equal, healthy, tiny.restore_params(trained, 6))
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(healthy)) < 100


def test_guard_rule():
    g = checkpointing.DivergenceGuard(10.0)
    for losses, ok in (([5.0, 4.0], True), ([3.0, 60.0], False), ([3.0, 2.9], True), ([float("nan")], False)):
        for x in losses:
            g.observe({"loss": np.float32(x), "nonfinite_in_a_row": np.int32(0)})
        assert g.check()[0] is ok, losses
    g.observe({"loss": np.float32(3.0), "nonfinite_in_a_row": np.int32(1)})  # an update skipped
    assert g.check() == (False, "1 update(s) skipped as non-finite since the last checkpoint")
    # A step's loss predates its update: the parameters themselves are checked too.
    g.params_of = lambda state: state["params"]  # the job's parameters (Job.eval_params), not its statistics
    g.begin({"params": np.array([0.5, -2.0], np.float32), "nu": np.zeros(2, np.float32)})
    for w, nu, ok in ((-15.0, 1e9, True), (200.0, 0.0, False), (np.nan, 0.0, False), (100.0, 0.0, True)):
        g.observe({"loss": np.float32(3.0)})
        assert g.check({"params": np.array([w], np.float32), "nu": np.full(2, nu, np.float32)})[0] is ok, w


# ------------------------------------------------------------------------------------------------
# Release folders and the reconstruct CLI.
# ------------------------------------------------------------------------------------------------
def test_release_with_nan_weights_is_rejected_naming_the_tensor(tmp_path):
    t = release_tensors()
    t["trunk.blocks.0.attn.proj.weight"][0, :3] = np.nan
    write_release(str(tmp_path), t)
    with pytest.raises(CheckpointError) as e:
        vtp_jax.load_pretrained(str(tmp_path))
    msg = str(e.value)
    assert "trunk.blocks.0.attn.proj.weight (3 NaN" in msg and "model.safetensors" in msg and "\n" not in msg, msg
    from vtp_jax.checkpoints import released

    with pytest.raises(CheckpointError, match="non-finite"):  # what train.init_from reads with
        released.load_release(str(tmp_path), scan_layers=True)
    assert np.isnan(vtp_jax.load_pretrained(str(tmp_path), allow_nonfinite=True)
                    .params["trunk"]["blocks_0"]["attn"]["proj"]["kernel"]).any()


@pytest.mark.parametrize("change,needles", [
    (dict(vision_depth="4"), ("config.json", "vision_depth='4'", "expected a positive integer")),
    (dict(train_clip="yes"), ("config.json", "train_clip='yes'", "expected true or false")),
    (dict(vision_num_heads=4), ("trunk.rope_embed.periods", "vision_num_heads=4", "check vision_num_heads")),
])
def test_release_config_problems_name_file_and_field(tmp_path, change, needles):
    write_release(str(tmp_path), release_tensors(), dict(RELEASE_CONFIG, **change))
    with pytest.raises(CheckpointError) as e:
        vtp_jax.load_pretrained(str(tmp_path))
    assert all(n in str(e.value) for n in needles), str(e.value)
    assert "rope_base" not in str(e.value)


def test_release_integral_float_depth_loads(tmp_path):
    write_release(str(tmp_path), release_tensors(), dict(RELEASE_CONFIG, vision_depth=1.0))
    assert vtp_jax.load_pretrained(str(tmp_path)).config.depth == 1


def test_safetensors_header_that_disagrees_with_its_bytes(tmp_path):
    write_release(str(tmp_path), release_tensors())
    path = tmp_path / "model.safetensors"
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header["trunk.cls_token"]["shape"] = [1, 1, 65]  # 4 bytes more than its offsets hold
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + blob[8 + n:])
    with pytest.raises(CheckpointError) as e:
        vtp_jax.load_pretrained(str(tmp_path))
    msg = str(e.value)
    assert str(path) in msg and "'trunk.cls_token' has 256 bytes for shape [1, 1, 65] F32: expected 260" in msg, msg


def _png_claiming(path, width, height):
    """A valid 1x1 PNG whose IHDR claims width x height (CRC fixed)."""
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(path)
    b = bytearray(path.read_bytes())
    b[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    b[29:33] = zlib.crc32(bytes(b[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(b))


def test_reconstruct_reports_an_oversized_image_and_goes_on(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    write_release(str(folder), release_tensors())
    rng = np.random.default_rng(0)
    for name in ("a", "c"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    bomb = tmp_path / "b.png"
    _png_claiming(bomb, 60000, 60000)
    rc = reconstruct.main(["--checkpoint", str(folder), "--images", str(tmp_path / "a.png"), str(bomb),
                           str(tmp_path / "c.png"), "--out", str(tmp_path / "out"), "--size", "0"])
    assert rc == 1
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: {bomb}: too large"), errors
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]


def test_a_single_process_save_of_replicated_arrays_compiles_nothing(tmp_path):
    """Orbax's replica-parallel writing slices each replicated array per device with a program
    compiled per shape (11.5 s on a first save of the tiny state); one process writes them whole."""
    from jax.sharding import NamedSharding, PartitionSpec

    from vtp_jax.checkpoints import integrity

    mesh = jax.make_mesh((8,), ("data",))
    state = {f"w{i}": jax.device_put(np.full((8, 1001 + i), i, np.float32), NamedSharding(mesh, PartitionSpec()))
             for i in range(12)}  # shapes no other test compiles for
    integrity.checksums(state), checkpointing.parameter_scale(state)  # the save's two whole-state programs
    compiles = []
    listener = lambda event, secs, **kw: compiles.append(event) if event == BACKEND_COMPILE else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        ckpts = checkpointing.Checkpoints(tmp_path / "checkpoints", keep=2)
        assert ckpts.save(1, state)
        ckpts.wait_until_finished()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    restored = ckpts.manager.restore(1, args=checkpointing.ocp.args.Composite(
        state=checkpointing.ocp.args.StandardRestore(state)))["state"]
    assert all(np.array_equal(restored[k], state[k]) for k in state)
