"""The README as a user meets it: its Python snippet runs as written (on a tiny release folder in
place of the hub id, and two image files), and each command's most likely mistake is one error
naming the field the user sets."""
import os
import re

import numpy as np
import pytest
from PIL import Image

import tiny
from vtp_jax import jobs
from vtp_jax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snippets():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    folder = tiny.export_tokenizer(tmp_path / "release", 16, text=True)
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for name in ("cat.jpg", "dog.png"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(name)
    snippets = _snippets()
    assert snippets, "the README has no Python snippet"
    for code in snippets:
        scope = {}
        exec(code.replace("MiniMaxAI/VTP-Large-f16d64", folder), scope)  # noqa: S102
    assert scope["x"].shape == (2, 256, 256, 3) and scope["recon"].dtype == np.uint8
    assert scope["recon"].shape == (2, 256, 256, 3) and scope["best"].shape == (2,)


@pytest.mark.parametrize("config,field", [
    ("dit_demo", "latents.tokenizer"),  # the DiT demo run before the demo tokenizer exists
    ("eval_demo", "eval.checkpoint"),  # the eval command without the export
    ("vtp_l", "data.paths"),  # the pod command without its shards
])
def test_each_commands_likely_mistake_names_its_field(config, field, tmp_path):
    c = tiny.load_config(config)
    if config == "dit_demo":
        c.latents.tokenizer = str(tmp_path / "vtp_demo" / "export")  # the default path, not there yet
    if config == "eval_demo":
        c.eval.checkpoint = str(tmp_path / "nowhere" / "export")
    if config == "vtp_l":
        c.objectives.lpips_weight = 0.0
    with pytest.raises((ConfigError, FileNotFoundError)) as e:
        jobs.run(c, str(tmp_path / "w"))
    assert field in str(e.value), str(e.value)
