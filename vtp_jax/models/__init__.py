"""Flax modules: the one transformer block, VTP encoder/decoder/text tower, heads, LPIPS, discriminator."""
