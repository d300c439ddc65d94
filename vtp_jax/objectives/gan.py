"""Stage-2 GAN objectives for fine-tuning the pixel decoder (taming-transformers conventions).

Logits may have any shape (a PatchGAN gives one per patch); every loss is a mean over all of
them. The discriminator losses carry taming's factor 1/2 so that hinge and non-saturating
variants are on the same scale.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["hinge_d_loss", "hinge_g_loss", "non_saturating_d_loss", "non_saturating_g_loss",
           "adaptive_generator_weight"]


def _f32(a):
    return jnp.asarray(a).astype(jnp.float32)


def hinge_d_loss(logits_real, logits_fake):
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - _f32(logits_real)))
                  + jnp.mean(jax.nn.relu(1.0 + _f32(logits_fake))))


def hinge_g_loss(logits_fake):
    """-E[D(G(z))], the generator side of the hinge game."""
    return -jnp.mean(_f32(logits_fake))


def non_saturating_d_loss(logits_real, logits_fake):
    """0.5 * (E[-log sigmoid(D(x))] + E[-log(1 - sigmoid(D(G(z))))]), via softplus for stability."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-_f32(logits_real)))
                  + jnp.mean(jax.nn.softplus(_f32(logits_fake))))


def non_saturating_g_loss(logits_fake):
    """E[-log sigmoid(D(G(z)))]: Goodfellow's generator loss, strong gradients early in training."""
    return jnp.mean(jax.nn.softplus(-_f32(logits_fake)))


def adaptive_generator_weight(grad_rec, grad_gan, max_weight=1e4, eps=1e-4):
    """||dL_rec/dW|| / (||dL_gan/dW|| + eps), clipped to [0, max_weight], no gradient.

    Balances the GAN term against reconstruction (Esser et al. 2021). W is the decoder's last
    layer; the caller takes both gradients (arrays or pytrees) w.r.t. it and multiplies the
    result by its discriminator weight.
    """
    ratio = optax.tree.norm(grad_rec) / (optax.tree.norm(grad_gan) + eps)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight))
