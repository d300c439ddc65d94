"""Training: mesh and sharding, optax update, the pre-training step and the shared loop."""
