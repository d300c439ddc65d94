"""Test session set-up: 8 host CPU devices so that mesh tests run on any laptop or CI box."""
import os

# Must happen before jax initialises its backends.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
