"""The progress lines of the long jobs (latent extraction, sampling) tell the truth: each line's
rate, times the work done so far, is the time since the job started (the clock of the log
records), and its ETA is the work left at that rate."""
import logging
import re

import pytest

import tiny
from vtp_jax import jobs

SIZE = 16


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """The log records of a tiny DiT run (its latents extracted first: 3 parts of 16 images) and of
    the sample job on it (4 parts of 32 samples)."""
    seen = []
    handler = logging.Handler(logging.INFO)
    handler.emit = seen.append
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        tokenizer = tiny.export_tokenizer(tmp_path_factory.mktemp("tokenizer"), SIZE, text=False)
        c = tiny.dit_config(tokenizer, SIZE, num_train_images=48, stats_samples=16, steps=1)
        c.dit.sample.update(num_steps=3, every=0)
        dit_workdir = str(tmp_path_factory.mktemp("dit"))
        jobs.run(c, dit_workdir)
        c = tiny.load_config("sample")
        c.sample.update(checkpoint=dit_workdir, num_samples=128, batch_size=32, part_size=32, preview=0)
        c.train.mesh = (2, 1, 1)
        jobs.run(c, str(tmp_path_factory.mktemp("samples")))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return seen


def _lines(records, pattern):
    """(record time, match) of each record whose message matches `pattern`."""
    out = [(r.created, re.fullmatch(pattern, r.getMessage())) for r in records]
    return [(t, m) for t, m in out if m]


def _check(lines, done, total, rate_decimals, start=None):
    """Each line's rate against the clock: done / rate is the time since the job's start, the same
    start for every line (and `start`, a record logged just before it, when given); its ETA is
    the work left over the rate. `done`: the work done at each line."""
    assert len(lines) == len(done) >= 3, lines
    implied = []
    for (t, m), d in zip(lines, done):
        rate, eta = float(m["rate"]), float(m["eta"])
        slack = 0.5 * 10 ** -rate_decimals / rate  # the rate's rounding, relative
        implied.append((t - d / rate, d / rate * slack + 0.05))
        assert abs(eta - (total - d) / rate) <= 0.5 + (total - d) / rate * slack, (m[0], total - d)
    for (t0, tol), (t1, tol1) in zip(implied, implied[1:]):
        assert abs(t1 - t0) <= tol + tol1, implied  # one start for every line
    if start is not None:
        assert abs(implied[-1][0] - start) <= implied[-1][1] + 0.05, (implied, start)
    assert lines[-1][1]["eta"] == "0"


def test_latent_extraction_progress(records):
    lines = _lines(records, r"latents: part (?P<part>\d+) of 3 written, (?P<rate>[\d.]+) images/s, ETA (?P<eta>\d+) s")
    assert [int(m["part"]) for _, m in lines] == [1, 2, 3]
    _check(lines, [16, 32, 48], 48, rate_decimals=1)


def test_sample_job_progress(records):
    start = _lines(records, r"sample: 128 samples .* in 4 part\(s\) of 32, 0 already in .*")
    lines = _lines(records, r"sample: part (?P<part>\d) of 4 written \(samples (?P<first>\d+)-(?P<last>\d+)\), "
                            r"(?P<rate>[\d.]+) samples/s, ETA (?P<eta>\d+) s")
    assert len(start) == 1 and [(int(m["first"]), int(m["last"])) for _, m in lines] == [
        (0, 31), (32, 63), (64, 95), (96, 127)]
    _check(lines, [32, 64, 96, 128], 128, rate_decimals=2, start=start[0][0])
