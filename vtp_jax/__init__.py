"""vtp-jax."""
