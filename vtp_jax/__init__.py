"""vtp-jax: VTP visual tokenizer pre-training and the released VTP models in JAX."""
from vtp_jax.checkpoints.lightningdit import PretrainedDiT, load_lightningdit
from vtp_jax.pretrained import Pretrained, load_pretrained

__all__ = ["Pretrained", "load_pretrained", "PretrainedDiT", "load_lightningdit"]
