"""The README's pictures, made from runs of the project's own jobs (nothing drawn by hand):

  python docs/make_figures.py --demo /tmp/vtp_demo [--dit /tmp/vtp_dit] --out docs/figures

- objectives.png: the three objectives around encoder / bottleneck / decoder / text tower;
- demo_reconstructions.png: the demo's last reconstruction rows (input | reconstruction), as the
  pretrain job wrote them to W/reconstructions/;
- demo_losses.png: the demo's loss curves, read back from its TensorBoard events;
- dit_samples.png: the DiT demo's last class-conditional sample grid (W/samples/), each row
  labelled with its class, with --dit.
"""
from __future__ import annotations

import argparse
import glob
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402


def objectives(path: str) -> None:
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.set_xlim(0, 10), ax.set_ylim(0, 4.2), ax.axis("off")
    boxes = {"image": (0.0, 1.6, "image"), "encoder": (2.0, 1.6, "ViT encoder\n(trunk)"),
             "bottleneck": (4.0, 1.6, "bottleneck\n64-d latent"), "decoder": (6.0, 1.6, "pixel decoder"),
             "recon": (8.0, 1.6, "reconstruction"), "text": (2.0, 3.2, "text tower"),
             "teacher": (2.0, 0.1, "EMA teacher\n(trunk + head)")}
    for x, y, label in boxes.values():
        ax.add_patch(plt.Rectangle((x, y), 1.6, 0.8, fc="#eef3fb", ec="#335"))
        ax.text(x + 0.8, y + 0.4, label, ha="center", va="center", fontsize=9)
    arrow = dict(arrowstyle="->", color="#335")
    for a, b in (("image", "encoder"), ("encoder", "bottleneck"), ("bottleneck", "decoder"), ("decoder", "recon")):
        ax.annotate("", (boxes[b][0], boxes[b][1] + 0.4), (boxes[a][0] + 1.6, boxes[a][1] + 0.4), arrowprops=arrow)
    losses = [(3.7, 2.85, "L_clip: image-text contrast\n(B_clip = 16k pairs)", "#c33"),
              (3.7, 1.1, "L_ssl: DINOv2 + iBOT against the teacher\n(B_ssl = 4k of them)", "#383"),
              (7.6, 2.75, "L_rec: L1 + LPIPS\n(B_rec = 2k of them)", "#338")]
    for x, y, label, color in losses:
        ax.text(x, y, label, color=color, fontsize=8.5, ha="left", va="center")
    ax.set_title("VTP: one latent shaped by three objectives (L = 0.1 L_rec + L_ssl + L_clip)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def losses(demo: str, path: str) -> None:
    acc = event_accumulator.EventAccumulator(demo, size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    names = [n for n in ("l_clip", "l_dino", "l_ibot", "l_l1") if n in acc.Tags()["tensors"]]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for n in names:
        events = acc.Tensors(n)
        ax.plot([e.step for e in events], [float(np.asarray(e.tensor_proto.float_val or [0])[0])
                                           if e.tensor_proto.float_val else float(np.frombuffer(
                                               e.tensor_proto.tensor_content, np.float32)[0]) for e in events],
                label=n)
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="configs/demo.py: every objective learns")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def last_png(folder: str) -> str:
    files = sorted(glob.glob(os.path.join(folder, "*.png")))
    if not files:
        raise FileNotFoundError(f"no PNG in {folder}")
    return files[-1]


def dit_samples(dit: str, path: str) -> None:
    """The DiT demo's last sample grid, each row labelled with the class it was asked for."""
    import json

    import ml_collections

    from vtp_jax.data import procedural
    from vtp_jax.jobs import dit as dit_job

    grid = np.asarray(Image.open(last_png(os.path.join(dit, "samples"))).convert("RGB"))
    sample = ml_collections.ConfigDict(json.load(open(os.path.join(dit, "config.json")))["dit"]["sample"])
    names = [procedural.CLASS_NAMES[k] for k in dit_job.grid_labels(sample, len(procedural.CLASS_NAMES))]
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    ax.imshow(grid)
    ax.set_yticks((np.arange(len(names)) + 0.5) * grid.shape[0] / len(names), names, fontsize=8)
    ax.set_xticks([])
    ax.set_title(f"DiT demo: {sample.per_class} samples per requested class (CFG {sample.cfg_scale:g})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)  # kept small in git


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="workdir of the configs/demo.py run")
    ap.add_argument("--dit", help="workdir of the configs/dit_demo.py run")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    objectives(os.path.join(args.out, "objectives.png"))
    losses(args.demo, os.path.join(args.out, "demo_losses.png"))
    rows = Image.open(last_png(os.path.join(args.demo, "reconstructions")))
    rows.save(os.path.join(args.out, "demo_reconstructions.png"), optimize=True)
    if args.dit:
        dit_samples(args.dit, os.path.join(args.out, "dit_samples.png"))
    print("wrote", sorted(os.listdir(args.out)))


if __name__ == "__main__":
    main()
