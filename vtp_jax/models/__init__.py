"""Flax modules: the one transformer block family, the VTP encoder / decoder / text tower, heads,
the LightningDiT, LPIPS, pytorch-fid's Inception, the discriminator and the study's classifier."""
