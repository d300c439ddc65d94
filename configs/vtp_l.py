"""VTP-L (f16d64) with the paper's recipe: the documented entry for `configs/vtp.py:L`.

  python -m vtp_jax.main --config=configs/vtp_l.py --workdir=gs://bucket/vtp_l \\
    --config.data.paths='gs://bucket/datacomp/*.array_record' --config.objectives.lpips_params=...

Every field, its reason and the other sizes and ablations are in configs/vtp.py.

The paper's B_clip = 16,384 pairs per step (B_ssl 4,096, B_rec 2,048: the data defaults) on any
cluster: --config.train.accum_steps=k runs each step as k micro-batches with the same update
(vtp_jax/config.py, train.accum_steps), and accum_steps=0 lets the compile plan pick the smallest
k that fits (vtp_jax/train/aot.py; run it before renting: --config.train.compile_for=v5p-128).
What the TPU compiler assigns per chip for this config (compile-only devices, nothing run;
benchmarks/RESULTS.md, "The compile plans"; docs/cluster.md has the table):
  v5p-128, mesh (8, 8, 1):  accum_steps=2 -> 25.88 GiB of 95 (k=1: 116.75 GiB, does not fit)
  v5e-256, mesh (32, 8, 1): accum_steps=2 -> 10.64 GiB of 16 (k=1 refused by the compiler)
  v6e-256, mesh (32, 8, 1): accum_steps=1 -> 28.46 GiB of 32 (28.80 usable at the 10% margin)
  2 x v5e-256 (compile_slices=2, dcn_mesh (2, 1, 1)), mesh (64, 8, 1): accum_steps=4 -> 6.33 GiB
    of 16 (k=1: 16.72 GiB and k=2: 19.67 GiB, neither fits; XLA's collective pipeliner unrolls the
    two-trip accumulation loop there: with LIBTPU_INIT_ARGS=--xla_tpu_enable_collective_pipeliner=false
    k=2 takes 7.02 GiB, step time unmeasured; docs/cluster.md)
XLA:CPU's memory_analysis (another compiler: orientation for GPUs only; "Gradient accumulation"
there) gives 41.0 GiB temporaries at 2048 / 512 / 256 images per device with k=16. k must divide
the per-device B_rec. With --config.objectives.centering=sinkhorn_knopp (or model.head.use_bn) the
whole batch's iBOT targets (masked patches x 65,536 prototypes, float32) are held as well, whatever
k: ~4 GiB more per 128 / 32 / 16 images per device (XLA:CPU). Stochastic depth (drop_path_ssl)
draws per micro-batch: the same regularization, not the bit-identical update that accum_steps
gives without it.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("vtp", os.path.join(os.path.dirname(__file__), "vtp.py"))
_vtp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_vtp)


def get_config():
    return _vtp.get_config("L")
