"""The miniature study: its scoring classifier is accurate on real images (otherwise its scores
mean nothing), and the smoke variant runs every stage and fills every column."""
import csv
import os

import numpy as np
import pytest

import tiny
from vtp_jax.jobs import study


def test_domain_classifier_is_accurate_on_real_rendered_images(tmp_path):
    c = study.default_study().classifier
    c.num_train, c.num_val, c.steps, c.batch_size = 8192, 1024, 600, 64  # the default recipe, half the val set
    path, accuracy = study.train_classifier(c, str(tmp_path))
    assert accuracy > 0.9, accuracy  # 64 (colour, shape) classes: chance is 1.6%
    assert os.path.isfile(path)
    assert study.train_classifier(c, str(tmp_path)) == (path, accuracy)  # cached, not retrained


def test_findings_compare_gaps_with_the_spread():
    rows = [dict(variant=v, seed=s, **{k: base + 0.01 * s for k in study.COLUMNS})
            for v, base in (("ae", 0.2), ("vtp", 0.5)) for s in (0, 1)]
    summary = study.summarize(rows)
    assert summary[0]["gen_accuracy"] == pytest.approx(0.205) and summary[0]["gen_accuracy_std"] == pytest.approx(0.005)
    lines = "\n".join(study.findings(summary))
    assert "VTP's latents give better generation than the AE's: held" in lines
    assert "VTP's samples are closer to real images than the AE's: did NOT hold" in lines  # higher frechet is worse
    assert "cannot separate" not in lines
    for r in rows:  # no tokenizer's reconstructions recognisable: gen_accuracy's ceiling is chance
        r["recon_accuracy"] = 0.02
    assert "gen_accuracy cannot separate the tokenizers" in "\n".join(study.findings(study.summarize(rows)))


@pytest.mark.slow
def test_smoke_study_fills_every_column(tmp_path):
    config = tiny.load_config("study_understanding", "smoke")
    rows = study.run(config, str(tmp_path))
    variants = list(config.study.variants)  # the smoke study runs the two ends, AE and VTP
    assert [r["variant"] for r in rows] == variants
    with open(tmp_path / "study.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == variants
    for r in table:
        for k in study.COLUMNS + tuple(f"{c}_std" for c in study.COLUMNS):
            if k.startswith("zero_shot") and r["variant"] in ("ae", "ssl_ae") or k.startswith("lpips"):
                assert r[k] == "n/a", (r["variant"], k)  # no text tower / no VGG weights: said, not blank
            else:
                assert np.isfinite(float(r[k])), (r["variant"], k, r[k])
    for name in ("study.md", "study.png", "study_runs.csv", *(f"samples_{v}_s0.png" for v in variants)):
        assert os.path.isfile(tmp_path / name), name
    assert "## The paper's claims, checked" in open(tmp_path / "study.md").read()
