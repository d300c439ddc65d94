"""Test session set-up: 8 host CPU devices so that mesh tests run on any laptop or CI box."""
import os

# Tests compile many small programs and run each for milliseconds: trade XLA's CPU code quality
# for compile speed (about 2x faster compiles; numerics unchanged).
FAST_COMPILE = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# XLA:CPU's concurrency-optimised schedule lets fake devices reach independent collectives in
# different orders; on 2 cores the accumulated step's scans (8 devices, 4- and 8-way all-gathers)
# then deadlocked in the rendezvous now and then (seen 2026-12-03). The plain schedule does not.
FAST_COMPILE += " --xla_cpu_enable_concurrency_optimized_scheduler=false"

# Must happen before jax initialises its backends.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8" + FAST_COMPILE
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Identical programs (the same step on the same mesh in several tests, or in the subprocess runs
# of the trainer) compile once per CI run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/vtp_jax_test_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: one of the few tests that take minutes (deselect with -m 'not slow')")
