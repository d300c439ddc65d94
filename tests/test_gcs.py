"""Every path on gs://, offline: a local GCS emulator (gcp-storage-emulator on 127.0.0.1) serves
the bucket, reached through etils.epath / gcsfs (STORAGE_EMULATOR_HOST) and by orbax's TensorStore
(TENSORSTORE_GCS_HTTP_URL). The main job runs with a gs:// workdir, is killed with -9 and resumed,
exports, and the eval job scores the gs:// export into another gs:// workdir; `prepare` turns tars
in the bucket into shards in the bucket; everything lands in the bucket and nothing under the
local working directory."""
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time

import gcsfs.core
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "tests")
BUCKET = "vtp-test"
STEPS = 12  # the kill lands at step ~4 (a checkpoint to the emulator takes ~3 s): mid-run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gcp_storage_emulator") is None,
                                reason="gcp-storage-emulator (the [test] extra) is not installed")

# The emulator leaves out the x-goog-generation header real GCS sends with every download, which
# TensorStore (orbax's OCDBT checkpoints) reads; this adds it, and starts the server.
EMULATOR = """
import sys
from gcp_storage_emulator.handlers import objects
_download = objects.download
def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration") or 1)
objects.download = download
from gcp_storage_emulator.__main__ import main
sys.exit(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """(environment for the subprocesses, a function listing the bucket's object names)."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", EMULATOR, "start", "--host", "127.0.0.1", "--port", str(port),
                               "--in-memory", "--default-bucket", BUCKET],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None, "the GCS emulator did not start"
            time.sleep(0.2)
    env = dict(os.environ, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="x",
               EPATH_USE_TF="false", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")

    # The test lists the bucket in-process (the same gcsfs that etils.epath uses in the jobs): a
    # listing subprocess per poll took CPU from the run it watches.
    fs = gcsfs.core.GCSFileSystem(endpoint_url=url, token="anon", skip_instance_cache=True)  # no gRPC bucket probe

    def listing(prefix: str) -> list[str]:
        """The object names under gs://BUCKET/prefix/, relative to it, sorted ([] if none)."""
        fs.invalidate_cache()
        root = f"{BUCKET}/{prefix}/"
        return sorted(f[len(root):] for f in fs.find(root))

    yield env, listing
    server.terminate()
    server.wait(timeout=30)


def _main(env, cwd, log, *flags):
    """The main job in a subprocess, its output to the file `log` (a pipe nobody reads while the
    test polls the bucket would fill and stall it)."""
    cmd = [sys.executable, "-m", "vtp_jax.main", *flags]
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)


def _finish(proc, log, timeout=900):
    proc.wait(timeout=timeout)
    out = open(log).read()
    assert proc.returncode == 0, out[-4000:]
    return out


def test_train_kill_resume_export_and_eval_all_on_gcs(gcs, tmp_path):
    env, listing = gcs
    cwd = tmp_path / "cwd"  # the local working directory: must stay empty
    cwd.mkdir()
    run = f"gs://{BUCKET}/run"
    train = [f"--config={HERE}/tiny.py", f"--workdir={run}", f"--config.train.steps={STEPS}",
             "--config.train.checkpoint_every=2", "--config.train.images_every=6", "--config.train.keep_checkpoints=2"]

    # kill -9 once the step-2 checkpoint is in the bucket, then resume to the end.
    logs = tmp_path / "logs"
    logs.mkdir()
    first = _main(env, cwd, logs / "first.log", *train)
    deadline = time.time() + 900
    while "2/commit_success.txt" not in listing("run/checkpoints"):  # a finished step
        assert first.poll() is None, open(logs / "first.log").read()[-4000:]
        assert time.time() < deadline, "no checkpoint reached the bucket"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL, "the run ended before the kill: raise STEPS"
    out = _finish(_main(env, cwd, logs / "resume.log", *train), logs / "resume.log")
    assert "restored step" in out and "taking over the stale lock" in out, "\n".join(
        line for line in out.splitlines() if "runner.py" in line or "checkpointing.py" in line)[-3000:]

    files = listing("run")
    assert "config.json" in files and "metrics.json" not in files  # no evaluators in the tiny config
    assert {"export/config.json", "export/model.safetensors"} <= set(files)
    assert any(f.startswith(f"checkpoints/{STEPS}/state/") for f in files)
    assert any(f.startswith("events.out.tfevents.") for f in files)  # TensorBoard events, copied in
    assert any(f.startswith("reconstructions/") and f.endswith(".png") for f in files)
    assert "LOCK" not in files  # released at the end (the killed run's lock was taken over)

    # The eval job on the gs:// export, into a gs:// workdir.
    ev = [f"--config={HERE}/tiny.py:eval_demo", f"--workdir=gs://{BUCKET}/eval", f"--config.eval.checkpoint={run}/export"]
    _finish(_main(env, cwd, logs / "eval.log", *ev), logs / "eval.log")
    assert {"config.json", "metrics.json"} <= set(listing("eval"))

    assert os.listdir(cwd) == [], f"written locally: {os.listdir(cwd)}"


def _python(env, cwd, code):
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_prepare_reads_tars_from_and_writes_shards_to_gcs(gcs, tmp_path):
    """`python -m vtp_jax.data.prepare webdataset` with gs:// input tars and a gs:// output: the
    tars are streamed from the bucket, whole shards, their sidecars and the manifest land in it,
    and a second run finds them up to date there."""
    from test_data_prepare import add, image_bytes, read_shards

    env, listing = gcs
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    local = tmp_path / "tars"
    local.mkdir()
    want = {}
    for t in range(2):
        with tarfile.open(local / f"{t:05d}.tar", "w") as tar:
            for i in range(3):
                key, image, caption = f"{t:05d}.tar/{t}{i:04d}", image_bytes(10 * t + i), f"caption {t} {i}"
                add(tar, f"{t}{i:04d}.jpg", image)
                add(tar, f"{t}{i:04d}.txt", caption.encode())
                want[key] = (image, caption)
            add(tar, f"{t}9999.jpg", b"<html>404</html>")  # skipped: not an image
    _python(env, cwd, f"from vtp_jax import paths\nimport shutil\n"
                      f"for n in ('00000.tar', '00001.tar'):\n"
                      f"    shutil.copy('{local}/' + n, '{tmp_path}/up')\n"
                      f"    paths.upload('{tmp_path}/up', 'gs://{BUCKET}/tars/' + n)\n")
    assert listing("tars") == ["00000.tar", "00001.tar"]

    cmd = [sys.executable, "-m", "vtp_jax.data.prepare", "webdataset", "--input", f"gs://{BUCKET}/tars/*.tar",
           "--output", f"gs://{BUCKET}/shards", "--num_shards", "2", "--workers", "1"]
    first = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-4000:]
    assert f"wrote 6 records in 2 shards to gs://{BUCKET}/shards; skipped: not_an_image: 2" in first.stderr
    shards = ["records-00000-of-00002.array_record", "records-00001-of-00002.array_record"]
    assert listing("shards") == [".parts/" + s + ".json" for s in shards] + ["manifest.json"] + shards

    down = tmp_path / "down"
    down.mkdir()
    _python(env, cwd, f"from vtp_jax import paths\n"
                      f"for n in {['manifest.json'] + shards!r}:\n"
                      f"    open('{down}/' + n, 'wb').write(paths.read_bytes('gs://{BUCKET}/shards/' + n))\n")
    manifest, records = read_shards(str(down))
    assert manifest["records"] == 6 and manifest["skipped"] == {"not_an_image": 2}
    assert [s["bytes"] for s in manifest["shards"]] == [os.path.getsize(down / s) for s in shards]
    assert [i[0] for i in manifest["inputs"]] == [f"gs://{BUCKET}/tars/00000.tar", f"gs://{BUCKET}/tars/00001.tar"]
    assert {r["key"]: (r["image"], r["caption"].decode()) for r in records} == want

    again = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"prepare: gs://{BUCKET}/shards is up to date (6 records)" in again.stderr, again.stderr[-2000:]
    assert os.listdir(cwd) == [], f"written locally: {os.listdir(cwd)}"
