"""FID Inception-v3: our Flax port (vtp_jax.evals.fid) vs pytorch-fid, numerics and CPU speed.

Needs, besides this package, `pip install torch torchvision pytorch-fid` (this script is the only
place torch is imported; it is no dependency of vtp_jax):

  python benchmarks/inception_vs_pytorch_fid.py --sizes 64 299 --batch 4 --rounds 3 --cores 1

In one process it builds pytorch-fid's own `InceptionV3([3], resize_input=True,
normalize_input=True)` (FID weights layout) with random weights in place of the weight download,
writes them as a .pth, converts that file with `python -m vtp_jax.checkpoints.torch_convert
inception` (called in-process) and loads the result with `evals.fid.load_inception_params`. Then:
  (a) max |ours - ref| / max |ref| of the 2048-d pool features on the same random images (uniform
      noise and smooth coloured waves) at each --sizes (H = W; both sides resize to 299 bilinearly),
      and the same for the feature differences between images (what FID statistics depend on);
  (b) alternating A B A B timing of one batch of --batch images at --time-size px, float32 on CPU:
      ours jitted (compiled before timing) vs pytorch-fid under torch.no_grad(); medians of
      --rounds rounds and the ratio ours / reference. --cores N pins the whole process to N cores
      (torch's OpenMP threads suffer badly when other jobs share the cores).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from common import record
from vtp_jax.checkpoints import torch_convert
from vtp_jax.evals import fid


def random_state_dict(template: dict, seed: int) -> dict:
    """Random values for every entry of an Inception-v3 state dict (BatchNorm statistics valid)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in template.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = v.clone()
        elif k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        elif k.endswith("bn.weight"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("bn.bias"):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_mean"):
            sd[k] = 0.2 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) * 1.5 + 0.5
        elif k == "fc.weight":
            sd[k] = torch.randn(v.shape, generator=g) * v.shape[1] ** -0.5
        elif k == "fc.bias":
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        else:
            raise KeyError(f"unexpected Inception-v3 entry {k}")
    return sd


def reference_model(seed: int):
    """pytorch-fid's InceptionV3 (FID blocks, block 3 = 2048-d pool features) with random weights,
    and its state dict (the layout of pt_inception-2015-12-05-6726825d.pth)."""
    import torchvision
    from pytorch_fid import inception as pfid

    # The FID blocks subclass torchvision's and only change forward(): same entries and shapes.
    template = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                               init_weights=False).state_dict()
    sd = random_state_dict(template, seed)
    download = pfid.load_state_dict_from_url
    pfid.load_state_dict_from_url = lambda *a, **k: sd  # fid_inception_v3() loads it strictly
    try:
        model = pfid.InceptionV3([pfid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                 normalize_input=True).eval()
    finally:
        pfid.load_state_dict_from_url = download
    return model, sd


def images(n: int, size: int, rng) -> np.ndarray:
    """(n, size, size, 3) float32 in [0, 1]: half uniform noise, half smooth coloured waves."""
    k = n // 2
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    waves = []
    for _ in range(n - k):
        a, fx, fy = rng.uniform(0.2, 0.5), rng.uniform(0.5, 4), rng.uniform(0.5, 4)
        phase = rng.uniform(0, 6, 3)
        waves.append(np.clip(0.5 + a * np.sin(2 * np.pi * (fx * xx[..., None] + fy * yy[..., None]) + phase), 0, 1))
    x = np.concatenate([rng.uniform(0, 1, (k, size, size, 3)), np.stack(waves)])
    return x.astype(np.float32)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 299], help="image sizes (px) for the feature check")
    ap.add_argument("--check-batch", type=int, default=4, help="images per size in the feature check")
    ap.add_argument("--batch", type=int, default=8, help="images per timed call")
    ap.add_argument("--time-size", type=int, default=299, help="image size (px) of the timed batch")
    ap.add_argument("--rounds", type=int, default=5, help="A B rounds of the timing (after 2 warm-up rounds)")
    ap.add_argument("--cores", type=int, default=0, help="pin the process (both frameworks) to the first N cores "
                    "this process may use; torch gets one thread per core (default: all of them)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="", help="keep the .pth / .msgpack here (default: a temporary folder)")
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if args.cores:  # before XLA's and torch's thread pools exist: they inherit it and size by it
        cores = cores[: args.cores]
        os.sched_setaffinity(0, cores)

    import pytorch_fid
    import torch

    torch.set_num_threads(len(cores))
    ref_model, sd = reference_model(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        pth, msgpack = os.path.join(work, "rand_inception.pth"), os.path.join(work, "rand_inception.msgpack")
        torch.save(sd, pth)
        torch_convert.main(["inception", "--pth", pth, "--out", msgpack])
        params = fid.load_inception_params(msgpack)

    def reference(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return ref_model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())[0][:, :, 0, 0].numpy()

    features = jax.jit(fid.inception_features)
    rng = np.random.default_rng(args.seed + 1)
    lines = [f"process on {len(cores)} core(s): pytorch-fid {pytorch_fid.__version__} (torch {torch.__version__}, "
             f"{len(cores)} thread(s)) vs "
             f"vtp_jax.evals.fid.inception_features (jax {jax.__version__}, jitted), random weights converted "
             f"by `torch_convert inception`, float32"]
    checks = []
    for size in args.sizes:
        x = images(args.check_batch, size, rng)
        want = reference(x)
        got = np.asarray(features(params, x))
        assert got.shape == want.shape == (len(x), 2048), (got.shape, want.shape)
        pairs = rel(got[:, None] - got[None], want[:, None] - want[None])
        checks.append(f"{size}x{size}: {rel(got, want):.2e} (max |ref| {np.abs(want).max():.3g}; of the "
                      f"differences between images {pairs:.2e})")
    lines.append(f"features (B={args.check_batch}, 2048-d) max |ours - ref| / max |ref|: " + "; ".join(checks))

    x = images(args.batch, args.time_size, rng)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    def time_ours() -> float:
        t = time.perf_counter()
        features(params, x).block_until_ready()
        return time.perf_counter() - t

    def time_ref() -> float:
        with torch.no_grad():
            t = time.perf_counter()
            ref_model(xt)
            return time.perf_counter() - t

    for _ in range(2):  # compiles ours; warms both
        time_ours(), time_ref()
    rows = np.array([(time_ours(), time_ref()) for _ in range(args.rounds)])
    ours, ref = np.median(rows, axis=0)
    lines.append(f"CPU time for {args.batch} images at {args.time_size}px, alternating ours / reference over "
                 f"{args.rounds} rounds: median ours {ours * 1e3:.0f} ms ({args.batch / ours:.1f} img/s), "
                 f"pytorch-fid {ref * 1e3:.0f} ms ({args.batch / ref:.1f} img/s); ratio of medians ours/ref "
                 f"{ours / ref:.2f}, median per-round ratio {np.median(rows[:, 0] / rows[:, 1]):.2f}, "
                 f"min ours/ref {rows[:, 0].min() / rows[:, 1].min():.2f}")
    record("FID Inception vs pytorch-fid", lines)


if __name__ == "__main__":
    main()
