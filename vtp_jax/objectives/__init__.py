"""VTP objectives as pure JAX functions: `from vtp_jax import objectives; objectives.clip_loss(...)`."""
from vtp_jax.objectives.clip import *  # noqa: F401,F403
from vtp_jax.objectives.dino import *  # noqa: F401,F403
from vtp_jax.objectives.reconstruction import *  # noqa: F401,F403
from vtp_jax.objectives.gan import *  # noqa: F401,F403
from vtp_jax.objectives.flow import *  # noqa: F401,F403
from vtp_jax.objectives.microbatch import *  # noqa: F401,F403
