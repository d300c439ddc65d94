"""vtp-jax: VTP visual tokenizer pre-training and the released VTP models in JAX.

    import vtp_jax
    vtp = vtp_jax.load_pretrained("MiniMaxAI/VTP-Large-f16d64")   # or a local / gs:// folder
    x = vtp_jax.load_images(["cat.jpg", "dog.png"], size=256)      # (2, 256, 256, 3) normalised
    recon = vtp_jax.to_pixels(vtp.decode(vtp.encode(x)))           # (2, 256, 256, 3) uint8
"""
from vtp_jax.checkpoints.lightningdit import PretrainedDiT, load_lightningdit
from vtp_jax.images import load_images, to_pixels
from vtp_jax.pretrained import Pretrained, load_pretrained

__all__ = ["Pretrained", "load_pretrained", "load_images", "to_pixels", "PretrainedDiT", "load_lightningdit"]
