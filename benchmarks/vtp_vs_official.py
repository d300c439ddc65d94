"""Released-model inference: vtp_jax.load_pretrained vs the official PyTorch VTP, numerics, CPU speed
and where our time goes.

Needs, besides this package, torch, transformers and safetensors and a checkout of the official
release (https://github.com/MiniMax-AI/VTP; its `vtp/` package is imported from --official, nothing
of it is copied here):

  python benchmarks/vtp_vs_official.py --official /path/to/VTP --rounds 5 --cores 1

In one process it builds the official `VTPModel` at VTP-S size (or opens --release, a released
folder), puts random values in every tensor, saves it with `save_pretrained` and opens that folder
with `vtp_jax.load_pretrained`. Then:
  (a) max |ours - ref| / max |ref| of the latents (get_reconstruction_latents) and of the decoded
      images (get_latents_decoded_images of the official latents);
  (b) alternating A B A B timing of encode and of decode: ours jitted (compiled before timing)
      vs the official model under torch.no_grad(); medians over --rounds rounds and ratios
      reference / ours (> 1: ours is faster);
  (c) a profile of our encode and decode (jax.profiler, one traced call): the share of time in
      each kind of XLA op, grouped by the model operation it came from, and the dense matmuls'
      achieved FLOP/s next to a lone matmul of the MLP's shape measured in the same process.
--cores N pins the process to N cores (torch's OpenMP threads suffer when other jobs share them).
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import record
import vtp_jax
from vtp_jax.models.layers import mlp_hidden

# VTP-S: the smallest released architecture (released_vtp.md), reconstruction path only.
VTP_S = dict(image_size=256, train_clip=False, train_reconstruction=True, vision_patch_size=16, vision_embed_dim=384,
             vision_depth=12, vision_num_heads=6, vision_feature_bottleneck=64, decoder_embed_dim=384,
             decoder_num_heads=6, decoder_depth=12, text_embed_dim=384, text_num_heads=6, text_depth=1)

# Profile categories: the first pattern found in an op's `op_name` names it.
CATEGORIES = (("qkv / proj / mlp matmuls", r"/(qkv|proj|w1|w2|w3|fc1|fc2)/.*dot_general"),
              ("attention (logits, softmax, values)", r"/attn/vmap"),
              ("RoPE", r"apply_rope|_rotate_half|/attn/(concatenate|mul|add|reduce_precision)"),
              ("norms", r"/norm\d?/|_norm/"),
              ("patch embed / bottleneck / pixel head", r"patch_embed|bottleneck|pixel|head|conv"),
              ("layout (transpose, reshape, copy)", r"transpose|reshape|squeeze|slice|concatenate|copy"),
              ("residual adds, SwiGLU products", r"add|mul|logistic"))


def randomize(model, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_((1.0 if "norm" in name or "weight" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def profile(fn, arg, label: str) -> list[str]:
    """Shares of one call's op time by category, from a jax.profiler trace of the compiled call."""
    from jax._src.lib import _profile_data

    compiled = fn.lower(arg).compile()
    op_names = {}
    for m in re.finditer(r"^\s*%(\S+) = .*?op_name=\"([^\"]*)\"", compiled.as_text(), re.M):
        op_names[m.group(1)] = m.group(2)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            jax.block_until_ready(fn(arg))
        data = _profile_data.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    spent = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in op_names:
                    op = op_names[ev.name]
                    kind = next((k for k, pattern in CATEGORIES if re.search(pattern, op)), "other")
                    spent[kind] += ev.duration_ns
    total = sum(spent.values())
    return [f"{label}: " + ", ".join(f"{k} {v / total:.0%}" for k, v in spent.most_common()) +
            f" (of {total / 1e6:.0f} ms of op time)"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True, help="a checkout of the official VTP release (holds vtp/)")
    ap.add_argument("--release", default="", help="a released folder to time instead of a random VTP-S")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5, help="A B rounds (after one warm-up round)")
    ap.add_argument("--cores", type=int, default=0, help="pin the process (both frameworks) to the first N cores "
                    "this process may use; torch gets one thread per core (default: all of them)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if args.cores:  # before XLA's and torch's thread pools exist: they inherit it and size by it
        cores = cores[: args.cores]
        os.sched_setaffinity(0, cores)

    sys.path.insert(0, os.path.abspath(args.official))
    import torch
    from vtp.models.vtp_hf import VTPConfig, VTPModel

    torch.set_num_threads(len(cores))
    with tempfile.TemporaryDirectory() as tmp:
        if args.release:
            official = VTPModel.from_pretrained(args.release).eval()
            folder, what = args.release, args.release
        else:
            official = VTPModel(VTPConfig(**VTP_S)).eval()
            randomize(official, args.seed)
            official.save_pretrained(tmp)
            folder, what = tmp, "random VTP-S"
        ours = vtp_jax.load_pretrained(folder)

    b, s = args.batch, args.image_size
    x = torch.from_numpy(np.random.default_rng(args.seed).standard_normal((b, 3, s, s)).astype(np.float32))
    nhwc = lambda a: np.ascontiguousarray(a.permute(0, 2, 3, 1).numpy())  # noqa: E731
    x_nhwc = nhwc(x)
    with torch.no_grad():
        z_ref = official.get_reconstruction_latents(x)
        img_ref = official.get_latents_decoded_images(z_ref)
    z_ref_nhwc = nhwc(z_ref)
    z_ours = np.asarray(ours.encode(x_nhwc))
    img_ours = np.asarray(ours.decode(z_ref_nhwc))
    lines = [f"process on {len(cores)} core(s): official VTPModel (torch {torch.__version__}, {len(cores)} thread(s), "
             f"eager) vs vtp_jax.load_pretrained (jax {jax.__version__}, jitted); {what}, float32, batch {b} at {s} px",
             f"max |ours - ref| / max |ref|: latents {rel(z_ours, z_ref_nhwc):.2e}, decoded images "
             f"{rel(img_ours, nhwc(img_ref)):.2e}"]

    x_dev, z_dev = jnp.asarray(x_nhwc), jnp.asarray(z_ref_nhwc)

    def timed(f, a) -> float:
        start = time.perf_counter()
        out = f(a)
        if hasattr(out, "block_until_ready"):
            out.block_until_ready()
        return time.perf_counter() - start

    with torch.no_grad():
        for name, mine, theirs, a_ours, a_ref in (
                ("encode", ours.encode, official.get_reconstruction_latents, x_dev, x),
                ("decode", ours.decode, official.get_latents_decoded_images, z_dev, z_ref)):
            timed(mine, a_ours), timed(theirs, a_ref)  # compiles ours; warms both
            rows = np.array([(timed(mine, a_ours), timed(theirs, a_ref)) for _ in range(args.rounds)])
            t_ours, t_ref = np.median(rows, axis=0)
            lines.append(f"{name}, alternating ours / official over {args.rounds} rounds: median ours "
                         f"{t_ours * 1e3:.0f} ms ({b / t_ours:.2f} img/s), official {t_ref * 1e3:.0f} ms "
                         f"({b / t_ref:.2f} img/s); speed-up ref/ours {t_ref / t_ours:.2f}, median per-round "
                         f"{np.median(rows[:, 1] / rows[:, 0]):.2f}")

    c = ours.config
    tokens = b * (s // c.patch_size) ** 2
    hidden = mlp_hidden(c.mlp, c.width, c.mlp_ratio)
    a = jnp.asarray(np.random.default_rng(1).standard_normal((tokens, c.width)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(2).standard_normal((c.width, hidden)), jnp.float32)
    matmul = jax.jit(lambda a: a @ w)
    t_mm = np.median([timed(matmul, a) for _ in range(10)])
    lines.append(f"a lone ({tokens} x {c.width}) @ ({c.width} x {hidden}) matmul in this process: "
                 f"{2 * tokens * c.width * hidden / t_mm / 1e9:.1f} GFLOP/s")
    for name, f, arg in (("encode", ours._fns[("encode", ())], x_dev), ("decode", ours._fns[("decode", ())], z_dev)):
        lines += profile(jax.jit(lambda a, f=f: f(ours.params, a)), arg, f"ours, {name} op time by kind")
    record("Released-model inference vs the official code", lines)


if __name__ == "__main__":
    main()
