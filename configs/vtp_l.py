"""VTP-L (f16d64) with the paper's recipe: the documented entry for `configs/vtp.py:L`.

  python -m vtp_jax.main --config=configs/vtp_l.py --workdir=gs://bucket/vtp_l \\
    --config.data.paths='gs://bucket/datacomp/*.array_record' --config.objectives.lpips_params=...

Every field, its reason and the other sizes and ablations are in configs/vtp.py.

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
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("vtp", os.path.join(os.path.dirname(__file__), "vtp.py"))
_vtp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_vtp)


def get_config():
    return _vtp.get_config("L")
