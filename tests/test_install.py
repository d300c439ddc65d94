"""What a user who only wants the released models gets: `pip install -e .` (the core, installed
here into a fresh virtual environment without extras) loads a release folder and encodes and
decodes without any training-only package; setup.py declares the extras the README uses; hub ids
resolve offline from a cache laid out as huggingface_hub lays it out."""
import json
import os
import re
import runpy
import subprocess
import sys
import venv

import pytest
import setuptools
from packaging.requirements import Requirement

import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Modules the core must not import, and the distributions (setup.py names) that install them.
TRAINING_ONLY = ("tensorflow", "tensorflow_datasets", "grain", "orbax", "optax", "clu", "diffrax", "matplotlib",
                 "array_record", "torch", "huggingface_hub", "gcsfs", "tqdm")
TRAINING_DISTRIBUTIONS = {"tensorflow", "tensorflow-cpu", "tensorflow-datasets", "tensorboard", "grain",
                          "orbax-checkpoint", "optax", "clu", "diffrax", "matplotlib", "array-record", "torch",
                          "huggingface-hub", "gcsfs", "tqdm"}
REPO = "MiniMaxAI/VTP-Small-f16d64"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _python(code: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return tiny.export_tokenizer(tmp_path_factory.mktemp("release"), 16, text=True)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, release):
    """The hub cache of one downloaded snapshot: models--ORG--NAME/{refs/main, snapshots/COMMIT/...}."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes(open(os.path.join(release, name), "rb").read())
    return str(cache)


@pytest.fixture(scope="module")
def core_python(tmp_path_factory):
    """The python of a fresh virtual environment with `pip install -e <repo>` and no extras (pip
    takes the packages from its caches and indexes; a minute or two). --no-compile: the
    packages' bytecode is written when first imported, for the modules the test imports only
    (install + first import 60 -> 37 s here)."""
    env_dir = tmp_path_factory.mktemp("core_venv")
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    done = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile", "-e",
                           ROOT],
                          capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return python


@pytest.mark.slow
def test_core_install_imports_no_training_package(core_python, release, tmp_path):
    """In the core-only environment the training packages are absent (not only unimported), and
    the core API encodes, decodes and reconstructs a release folder importing none of them."""
    code = f"""
import importlib.util, json, sys
import numpy as np
import vtp_jax
absent = [n for n in {TRAINING_ONLY!r} if importlib.util.find_spec(n) is None]
m = vtp_jax.load_pretrained({release!r})
z = m.encode(np.zeros((1, 16, 16, 3), np.float32))
x = m.decode(z)
from vtp_jax import reconstruct
print(json.dumps(dict(file=vtp_jax.__file__, absent=absent, z=list(z.shape), x=list(x.shape),
                      imported=sorted({{n.split('.')[0] for n in sys.modules}} & set({TRAINING_ONLY!r})))))
"""
    out = subprocess.run([core_python, "-I", "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": "", "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["file"] == os.path.join(ROOT, "vtp_jax", "__init__.py")  # the editable install of this checkout
    # flax itself depends on optax and orbax-checkpoint: installed with the core, never imported by it.
    assert set(TRAINING_ONLY) - set(got["absent"]) == {"optax", "orbax"}, got["absent"]
    assert got["imported"] == [] and got["z"] == [1, 2, 2, 8] and got["x"] == [1, 16, 16, 3], got


def test_hub_id_loads_offline_from_the_cache(hub_cache, release):
    code = f"""
import numpy as np
import vtp_jax
m = vtp_jax.load_pretrained({REPO!r})
ref = vtp_jax.load_pretrained({release!r})
x = np.random.default_rng(0).standard_normal((1, 16, 16, 3)).astype(np.float32)
print(float(np.abs(np.asarray(m.encode(x)) - np.asarray(ref.encode(x))).max()))
"""
    out = _python(code, {"HF_HUB_CACHE": hub_cache, "HF_HUB_OFFLINE": "1"})
    assert float(out.strip().splitlines()[-1]) == 0.0


def test_unknown_hub_id_offline_is_one_line_saying_what_to_do(hub_cache):
    code = """
import vtp_jax
from vtp_jax.checkpoints.hub import HubError
try:
    vtp_jax.load_pretrained("MiniMaxAI/VTP-Huge-f16d64")
except HubError as e:
    print(e)
"""
    out = _python(code, {"HF_HUB_CACHE": hub_cache, "HF_HUB_OFFLINE": "1"}).strip()
    assert len(out.splitlines()) == 1
    assert "MiniMaxAI/VTP-Huge-f16d64" in out and "HF_HUB_OFFLINE=1" in out and "local folder" in out


def _setup_arguments() -> dict:
    """The keyword arguments setup.py passes to setuptools.setup."""
    seen = {}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
        runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    return seen


def test_setup_declares_the_extras_the_readme_uses():
    setup = _setup_arguments()
    names = lambda reqs: {Requirement(r).name.lower().replace("_", "-") for r in reqs}  # noqa: E731
    extras = setup["extras_require"]
    readme = open(os.path.join(ROOT, "README.md")).read()
    used = set(re.findall(r'pip install -e "\.\[(\w+)\]"', readme)) | set(re.findall(r"`\[(\w+)\]`", readme))
    assert used == {"train", "hub", "torch", "test", "tpu", "cuda"}, used
    assert used <= set(extras) and extras["eval"] == extras["train"]
    assert names(setup["install_requires"]) & TRAINING_DISTRIBUTIONS == set()  # the core stays lean
    assert {"tensorflow-datasets", "grain", "orbax-checkpoint", "optax", "clu", "diffrax", "gcsfs"} <= names(
        extras["train"])
    assert "optax>=0.2.5" in extras["train"]  # optax.tree.norm
    assert names(extras["test"]) >= names(extras["train"]) | names(extras["hub"]) | {"pytest", "gcp-storage-emulator"}
    assert names(extras["hub"]) == {"huggingface-hub"} and names(extras["torch"]) == {"torch"}
