"""Evaluation metrics for generated images (FID), computed on device and reduced on the host."""
