"""Test session set-up: 8 host CPU devices so that mesh tests run on any laptop or CI box."""
import gc
import os

import pytest

# Tests compile many small programs and run each for milliseconds: trade XLA's CPU code quality
# for compile speed. Results differ from XLA's default optimisation at float32 rounding only, far
# inside every test's tolerance (measured: benchmarks/RESULTS.md, "XLA:CPU optimisation level in
# the tests"; VTP_TESTS_XLA_DEFAULT_OPT=1 runs the tests without these two flags).
FAST_COMPILE = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Multi-device XLA:CPU executables loaded from the persistent compilation cache (below) run
# independent loops concurrently and their devices reach the collectives in different orders: the
# 8-device accumulated step deadlocks in the rendezvous (benchmarks/RESULTS.md, "XLA:CPU rendezvous
# deadlock"; docs/training.md tells users). The plain schedule runs them in one order.
SCHEDULE = " --xla_cpu_enable_concurrency_optimized_scheduler=false"

# Must happen before jax initialises its backends.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8" + SCHEDULE
    + ("" if os.environ.get("VTP_TESTS_XLA_DEFAULT_OPT") == "1" else FAST_COMPILE)
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No Python tracebacks in the HLO's debug locations (what profilers show, not what runs): lowering
# the suite's many small programs is a tenth faster (benchmarks/RESULTS.md, "The test suite's time").
os.environ.setdefault("JAX_TRACEBACK_IN_LOCATIONS_LIMIT", "0")

# Identical programs (the same step on the same mesh in several tests, or in the subprocess runs
# of the trainer) compile once per CI run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/vtp_jax_test_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: one of the few tests that take minutes (deselect with -m 'not slow')")


# The session's heap grows to millions of objects (every jit cache of hundreds of programs), and
# each full garbage collection walks all of it: a tenth of test_faults.py's time at Python's default
# thresholds (benchmarks/RESULTS.md, "The test suite's time"). Full collections a tenth as often;
# what the imports made is frozen (never garbage), and so is everything when the session ends,
# where pytest's unraisable-exception check would run five full collections over it.
gc.set_threshold(700, 10, 100)


def pytest_collection_finish(session):
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config):
    gc.freeze()


# ------------------------------------------------------------------------------------------------
# No silent skips: a test that skips for a missing package or file has not passed. The only skips
# a run accepts are for hardware the machine lacks; their reason must start with one of these.
# Any other skip (pytest.skip, skipif, importorskip, in a test or at collection) fails the session
# with one line per test, so `python -m pytest -q tests` in CI exits non-zero.
# ------------------------------------------------------------------------------------------------
ALLOWED_SKIPS = (
    "needs a GPU",  # e.g. pytest.mark.skipif(not gpu_devices(), reason="needs a GPU: ...")
    "needs a TPU",
)
_unexpected_skips = []


def _skip_reason(report) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def _police_skip(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not reason.startswith(ALLOWED_SKIPS):
            _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report):
    _police_skip(report)


def pytest_collectreport(report):
    _police_skip(report)


def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _unexpected_skips:
        terminalreporter.section("unexpected skips (allowed: reasons starting with "
                                 + " / ".join(repr(a) for a in ALLOWED_SKIPS) + ")", red=True)
        for line in _unexpected_skips:
            terminalreporter.line(f"UNEXPECTED SKIP {line}", red=True)
