"""What a user who only wants the released models gets: `pip install -e .` (the core) loads a
release folder or a hub id and encodes, without importing any training-only package; hub ids
resolve offline from a cache laid out as huggingface_hub lays it out."""
import json
import os
import subprocess
import sys

import pytest

import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_ONLY = ("tensorflow", "tensorflow_datasets", "grain", "orbax", "optax", "clu", "diffrax", "matplotlib",
                 "array_record", "torch", "huggingface_hub", "gcsfs")
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


def test_core_api_imports_no_training_package(release):
    code = f"""
import sys, numpy as np
import vtp_jax
m = vtp_jax.load_pretrained({release!r})
z = m.encode(np.zeros((1, 16, 16, 3), np.float32))
assert z.shape == (1, 2, 2, 8), z.shape
heavy = sorted({{n.split('.')[0] for n in sys.modules}} & set({TRAINING_ONLY!r}))
print(heavy)
"""
    assert _python(code, {}).strip() == "[]"


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


def test_setup_declares_the_extras_the_readme_uses():
    text = open(os.path.join(ROOT, "setup.py")).read()
    for extra in ("train", "eval", "hub", "torch", "test"):
        assert f'"{extra}"' in text
    assert '"optax>=0.2.5"' in text  # optax.tree.norm
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert 'pip install -e ".[train]"' in readme and 'pip install -e ".[test]"' in readme
    assert json.loads(json.dumps(TRAINING_ONLY))  # the list above is what the core must not import
