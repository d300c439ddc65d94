"""VTP-L (f16d64) as released: ViT-L/16 trunk (24 x 1024), symmetric decoder, CLIP text tower.
Trained with the paper's recipe: `vtp_jax.config.paper_recipe` (bf16, FSDP, 16k / 4k / 2k batches).

The paper's scaling runs used a light 4-block decoder and QK-norm:
  --config.model.decoder.depth=4 --config.model.qk_norm=True --config.model.decoder.qk_norm=True
and the d = 256 variant: --config.model.latent_dim=256.

The paper's B_clip = 16,384 pairs per step (B_ssl 4,096, B_rec 2,048: the data defaults) on any
cluster: --config.train.accum_steps=k runs each step as k micro-batches with the same update
(vtp_jax/config.py, train.accum_steps). This config's compiled step, per device (XLA:CPU
memory_analysis on 8 CPU devices, fsdp 8, LPIPS in; benchmarks/RESULTS.md, "Gradient
accumulation"), has temporaries of about 1.1 GiB + 39 GiB per (128 / 32 / 16) CLIP / SSL / rec
images of per-device micro-batch, plus arguments: the state (1.5 GiB at fsdp 8) and the float32
batch (0.2 GiB per 128 / 32 / 16). Compiled at these exact per-device shapes:
  8 devices,   mesh (1, 8, 1), 2048 / 512 / 256 per device: accum_steps=16 -> 41.0 GiB
               temporaries + 4.6 GiB arguments (80 GB parts); accum_steps=32 -> 21.7 GiB (40-48 GB)
  64 devices,  mesh (8, 8, 1) (the default (-1, 8, 1)), 256 / 64 / 32: accum_steps=4 -> 20.9 GiB
               (+ 1.9); accum_steps=2 -> 40.3 GiB
  256 devices, mesh (32, 8, 1), 64 / 16 / 8: accum_steps=2 -> 11.0 GiB (+ 1.6); accum_steps=1 ->
               41.6 GiB (the whole-batch step holds twice what its micro-batches would)
k must divide the per-device B_rec (256, 32, 8 above). The figures hold for this recipe's
centering without the head's BatchNorm, where each micro-batch's teacher targets are computed in
the student's scan; with --config.objectives.centering=sinkhorn_knopp (or model.head.use_bn) the
whole batch's iBOT targets (masked patches x 65,536 prototypes, float32) are held: ~4 GiB more
per 128 / 32 / 16 per device (~64 GiB on 8 devices), whatever k. A GPU or TPU compiler assigns
buffers differently: check `compiled.memory_analysis()` there (benchmarks/accumulation.py
--memory). Stochastic depth (drop_path_ssl) draws per micro-batch: the same regularization, not
the bit-identical update that accum_steps gives without it.
"""
from vtp_jax import config as config_lib


def get_config():
    c = config_lib.default_config()
    config_lib.paper_recipe(c, "L")
    return c
