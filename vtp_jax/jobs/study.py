"""Job `study`: the paper's finding in miniature, "understanding drives generation".

    python -m vtp_jax.main --config=configs/study_understanding.py --workdir=W   (':smoke' for a quick pass)

For every seed and every tokenizer variant (AE: reconstruction only; CLIP+AE; SSL+AE; VTP: all
three), all with the same architecture, steps and batch (equal tokenizer compute):

1. pre-train the tokenizer on the procedural data (job `pretrain`, W/runs/<variant>_s<seed>/tokenizer);
2. evaluate it (job `eval`): reconstruction (PSNR, SSIM, LPIPS with its weights), understanding
   (linear probe and kNN on the bottleneck latent; zero-shot where it has a text tower);
3. train a tiny class-conditional DiT on its normalized latents with one recipe and compute for all
   (job `dit`), and score its samples with a domain classifier trained here on real rendered images
   (which knows every image's true class): the accuracy on generated images of each class, the
   Frechet distance in the classifier's feature space to real images (FID's idea with a domain
   network), and the DiT's validation flow loss on held-out latents.

Every step is one of the project's jobs through the shared runner, so a rerun resumes where it
stopped (finished stages are skipped). Writes W/study.csv (one row per tokenizer: the mean over
seeds and its spread), W/study_runs.csv (every run), W/study.md, W/study.png and sample grids.
"""
from __future__ import annotations

import csv
import io
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import serialization

from vtp_jax import config as config_lib
from vtp_jax import images, paths
from vtp_jax.data import procedural
from vtp_jax.jobs import dit, evaluate, extract_latents, pretrain
from vtp_jax.models.classifier import DomainClassifier
from vtp_jax.pretrained import load_pretrained
from vtp_jax.train import runner

VARIANTS = {  # objective weights (l_clip, l_ssl); l_rec from the template
    "ae": (0.0, 0.0),
    "clip_ae": (1.0, 0.0),
    "ssl_ae": (0.0, 1.0),
    "vtp": (1.0, 1.0),
}
COLUMNS = ("psnr", "ssim", "lpips", "linear_probe_top1", "knn_top1", "zero_shot_top1", "recon_accuracy",
           "gen_accuracy", "gen_frechet", "dit_val_loss")
CHANCE = 1 / 64  # the domain classifier's 64 (colour, shape) classes


def default_config() -> ml_collections.ConfigDict:
    """Which tokenizers, the job templates every run derives from (a pretrain and a dit config),
    the evaluators, the domain classifier."""
    c = config_lib.base_config("study")
    c.study = default_study()
    return c


def default_study() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.variants = ("ae", "clip_ae", "ssl_ae", "vtp")
    c.seeds = (0, 1)
    c.tokenizer = pretrain.default_config()  # each variant sets objectives.l_clip / l_ssl and the seed
    c.dit = dit.default_config()  # latents.tokenizer and the seed are set per run
    c.evals = ml_collections.ConfigDict()  # run on every tokenizer (job 'eval')
    c.classifier = ml_collections.ConfigDict()
    c.classifier.seed = 100  # procedural streams 100 (train) and 101 (validation): unseen elsewhere
    c.classifier.num_train, c.classifier.num_val = 8192, 2048
    c.classifier.image_size = 64  # rendered at the tokenizers' size (the network's stem strides to 32)
    c.classifier.width = 16
    c.classifier.steps, c.classifier.batch_size, c.classifier.lr = 600, 64, 3e-3  # ~98% top-1, ~2.5 CPU-min
    return c


def validate(config: ml_collections.ConfigDict, n_batch_shards: int = 1, n_processes: int = 1) -> list[str]:
    s, errs = config.study, []
    bad = [v for v in s.variants if v not in VARIANTS]
    if bad:
        errs.append(f"study.variants {bad} unknown: expected some of {sorted(VARIANTS)}")
    if not s.seeds:
        errs.append("study.seeds is empty")
    return errs


# ------------------------------------------------------------------------------------------------
# The domain classifier.
# ------------------------------------------------------------------------------------------------
def _render(seed: int, n: int, size: int):
    examples = [procedural.render_example(seed, i, size, max_objects=1) for i in range(n)]
    return (np.stack([e["image"] for e in examples]).astype(np.float32) / 255,
            np.array([e["label"] for e in examples], np.int32))


def train_classifier(c: ml_collections.ConfigDict, folder: str) -> tuple[str, float]:
    """Trains (or reloads) the domain classifier; returns (params file, accuracy on held-out real
    images). Adam on rendered single-object images; colour / shape are all it needs to see."""
    path, info = paths.join(folder, "classifier.msgpack"), paths.join(folder, "classifier.json")
    if paths.isfile(path) and paths.isfile(info):
        return path, paths.read_json(info)["accuracy"]
    paths.makedirs(folder)
    net = DomainClassifier(64, c.width)
    x, y = _render(c.seed, c.num_train, c.image_size)
    xv, yv = _render(c.seed + 1, c.num_val, c.image_size)
    params = net.init(jax.random.key(c.seed), x[:1])["params"]
    params = jax.tree.map(lambda b: b.value if hasattr(b, "value") else b, params,
                          is_leaf=lambda b: hasattr(b, "value"))
    tx = optax.adam(optax.cosine_decay_schedule(c.lr, c.steps))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, xb, yb):
        def loss(p):
            logits, _ = net.apply({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        g = jax.grad(loss)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt

    rng = np.random.default_rng(c.seed)
    for _ in range(c.steps):
        idx = rng.integers(0, len(x), c.batch_size)
        params, opt = step(params, opt, x[idx], y[idx])
    predict = jax.jit(lambda p, xb: jnp.argmax(net.apply({"params": p}, xb)[0], -1))
    correct = sum(int(np.sum(np.asarray(predict(params, xv[i:i + 256])) == yv[i:i + 256]))
                  for i in range(0, len(xv), 256))
    accuracy = correct / len(xv)
    paths.write_bytes(path, serialization.msgpack_serialize(jax.device_get(params)))
    paths.write_json(info, {"accuracy": accuracy, "num_val": len(xv)})
    logging.info("domain classifier: %.4f top-1 on %d held-out real images", accuracy, len(xv))
    return path, accuracy


def reconstruction_accuracy(export: str, classifier: str, seed: int, n: int, size: int) -> float:
    """The domain classifier's top-1 on a tokenizer's reconstructions of n real images: the
    ceiling of gen_accuracy (a DiT that matched the latent distribution exactly would decode to
    images like these), so the generation scores mean something only where it is well above chance."""
    params = serialization.msgpack_restore(paths.read_bytes(classifier))
    net = DomainClassifier(64, params["conv0_0"]["kernel"].shape[-1])
    tokenizer = load_pretrained(export)
    x, y = _render(seed, n, size)
    hits = 0
    for i in range(0, n, 64):
        rec = images.denormalize(tokenizer.decode(tokenizer.encode(images.normalize(255 * x[i:i + 64]))))
        logits, _ = net.apply({"params": params}, jnp.floor(255 * jnp.clip(rec, 0, 1)) / 255)
        hits += int(np.sum(np.argmax(np.asarray(logits), -1) == y[i:i + 64]))
    return hits / n


# ------------------------------------------------------------------------------------------------
# The runs.
# ------------------------------------------------------------------------------------------------
def tokenizer_config(s, variant: str, seed: int):
    c = s.tokenizer.copy_and_resolve_references()
    c.objectives.l_clip, c.objectives.l_ssl = VARIANTS[variant]
    c.seed = seed
    return c


def eval_config(s, checkpoint: str):
    c = evaluate.default_config()
    c.train.mesh = s.tokenizer.train.mesh
    c.eval.checkpoint = checkpoint
    c.evals = s.evals.copy_and_resolve_references()
    return c


def dit_config(s, tokenizer: str, seed: int, classifier: str, val_latents: str):
    c = s.dit.copy_and_resolve_references()
    c.latents.tokenizer = tokenizer
    c.seed = seed
    c.evals.generation_classes.classifier_params = classifier
    c.evals.val_loss.latents = val_latents
    return c


def extract_config(dit_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `extract_latents` job for the latents a dit config would extract."""
    c = extract_latents.default_config()
    c.seed, c.train.mesh = dit_config.seed, dit_config.train.mesh
    c.latents = dit_config.latents
    return c


def _done(workdir: str) -> bool:
    return paths.isfile(paths.join(workdir, "metrics.json"))


def run_one(s, variant: str, seed: int, classifier: str, root: str) -> dict:
    """One tokenizer through pre-training, evaluation, latents and its DiT; returns its row."""
    d = paths.join(root, "runs", f"{variant}_s{seed}")
    t0 = time.time()
    tok_dir, eval_dir, dit_dir = (paths.join(d, n) for n in ("tokenizer", "eval", "dit"))
    if not paths.isdir(paths.join(tok_dir, "export")):
        runner.run(pretrain, tokenizer_config(s, variant, seed), tok_dir)
    export = paths.join(tok_dir, "export")
    if not _done(eval_dir):
        runner.run(evaluate, eval_config(s, export), eval_dir)
    val_latents = paths.join(d, "val_latents")
    lat = s.dit.copy_and_resolve_references()
    lat.latents.tokenizer = export
    lat.latents.data.procedural_seed += 1  # the validation stream: seed + 1, unseen in training
    lat.latents.data.num_train_images //= 4
    runner.run(extract_latents, extract_config(lat), val_latents)
    if not _done(dit_dir):
        runner.run(dit, dit_config(s, export, seed, classifier, val_latents), dit_dir)
    ceiling = paths.join(eval_dir, "recon_accuracy.json")
    if not paths.isfile(ceiling):
        held_out = s.classifier.seed + 1  # the classifier's validation stream, unseen by it and the tokenizers
        acc = reconstruction_accuracy(export, classifier, held_out, s.classifier.num_val, s.tokenizer.data.image_size)
        paths.write_json(ceiling, {"recon_accuracy": acc})
    ev, gen = paths.read_json(paths.join(eval_dir, "metrics.json")), paths.read_json(paths.join(dit_dir, "metrics.json"))
    grids = sorted(paths.listdir(paths.join(dit_dir, "samples")))
    paths.write_bytes(paths.join(root, f"samples_{variant}_s{seed}.png"), paths.read_bytes(paths.join(dit_dir, "samples", grids[-1])))
    return {"variant": variant, "seed": seed, "psnr": ev["psnr"], "ssim": ev["ssim"], "lpips": ev.get("lpips", np.nan),
            "linear_probe_top1": ev["linear_probe/top1"], "knn_top1": ev["knn/top1"],
            "zero_shot_top1": ev.get("zero_shot/top1", np.nan),  # no text tower: not measurable
            "recon_accuracy": paths.read_json(ceiling)["recon_accuracy"],
            "gen_accuracy": gen["generation_classes/accuracy"], "gen_frechet": gen["generation_classes/frechet"],
            "dit_val_loss": gen["val_loss/loss"], "minutes": (time.time() - t0) / 60}


def make_job(config: ml_collections.ConfigDict, mesh, workdir: str | None = None) -> runner.Job:
    return runner.Job(config=config, init=None, run=lambda: run(config, workdir))


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    s = config.study
    paths.makedirs(workdir)
    if not jax.config.jax_compilation_cache_dir:  # the runs compile many identical programs: once is enough
        jax.config.update("jax_compilation_cache_dir", paths.join(workdir, "compile_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    t0 = time.time()
    classifier, accuracy = train_classifier(s.classifier, paths.join(workdir, "classifier"))
    rows = [run_one(s, v, seed, classifier, workdir) for seed in s.seeds for v in s.variants]
    write_outputs(workdir, rows, accuracy, (time.time() - t0) / 60, config)
    return rows


# ------------------------------------------------------------------------------------------------
# Outputs.
# ------------------------------------------------------------------------------------------------
def summarize(rows: list[dict]) -> list[dict]:
    """One row per variant: the mean over seeds of every column, and its std (0 for one seed)."""
    out = []
    for v in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == v]
        row = {"variant": v, "seeds": len(runs)}
        for k in COLUMNS:
            vals = np.array([r[k] for r in runs], np.float64)
            row[k], row[f"{k}_std"] = float(np.mean(vals)), float(np.std(vals))
        out.append(row)
    return out


def _write_csv(path, rows):
    """NaN (a metric a tokenizer cannot have: zero-shot without a text tower) is written 'n/a'."""
    def cell(v):
        return "n/a" if isinstance(v, float) and np.isnan(v) else v

    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows({k: cell(v) for k, v in r.items()} for r in rows)
    paths.write_text(path, text.getvalue())


def findings(summary: list[dict]) -> list[str]:
    """The paper's claims, checked on these numbers (a claim holds when the gap exceeds the spread)."""
    by = {r["variant"]: r for r in summary}
    lines = []

    def compare(a, b, key, higher_better, claim):
        if a not in by or b not in by:
            return
        x, y = by[a][key], by[b][key]
        gap = (x - y) if higher_better else (y - x)
        spread = by[a][f"{key}_std"] + by[b][f"{key}_std"]
        verdict = "held" if gap > spread else ("not separated" if gap > -spread else "did NOT hold")
        lines.append(f"- {claim}: {verdict} ({key}: {a} {x:.4g} vs {b} {y:.4g}, spread {spread:.2g}).")

    ceiling = max(r["recon_accuracy"] for r in summary)
    if ceiling < 3 * CHANCE:
        lines.append(f"- The domain classifier recognises at most {ceiling:.1%} of any tokenizer's reconstructions of real "
                     f"images (chance {CHANCE:.1%}): at this budget the decoders do not reproduce what the classes "
                     "differ in, so gen_accuracy cannot separate the tokenizers; gen_frechet and the understanding "
                     "columns still can.")
    compare("vtp", "ae", "gen_accuracy", True, "VTP's latents give better generation than the AE's")
    compare("vtp", "ae", "gen_frechet", False, "VTP's samples are closer to real images than the AE's")
    compare("clip_ae", "ae", "gen_accuracy", True, "CLIP added to reconstruction improves generation")
    compare("ssl_ae", "ae", "gen_accuracy", True, "SSL added to reconstruction improves generation")
    compare("vtp", "ae", "linear_probe_top1", True, "VTP's latent is more linearly separable than the AE's")
    compare("ae", "vtp", "psnr", True, "reconstruction-only reconstructs best (the trade-off the paper reports)")
    if len(summary) > 2:
        u = np.array([r["linear_probe_top1"] for r in summary])
        g = np.array([r["gen_accuracy"] for r in summary])
        if np.std(u) > 0 and np.std(g) > 0:
            lines.append(f"- understanding vs generation across tokenizers: Pearson r = {np.corrcoef(u, g)[0, 1]:.2f} "
                         "(linear probe top-1 vs generated-image accuracy).")
    return lines


def write_outputs(workdir: str, rows: list[dict], classifier_accuracy: float, minutes: float, config):
    summary = summarize(rows)
    _write_csv(paths.join(workdir, "study_runs.csv"), rows)
    _write_csv(paths.join(workdir, "study.csv"), summary)
    plot(paths.join(workdir, "study.png"), summary)
    header = "| tokenizer | " + " | ".join(COLUMNS) + " |"
    table = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for r in summary:
        table.append(f"| {r['variant']} | " + " | ".join(
            "n/a" if np.isnan(r[k]) else f"{r[k]:.4g} ± {r[f'{k}_std']:.2g}" for k in COLUMNS) + " |")
    text = [
        "# Understanding drives generation: the miniature study", "",
        f"{len(config.study.seeds)} seed(s) x {len(config.study.variants)} tokenizers, {minutes:.0f} min in all. "
        f"Mean ± std over seeds. Domain classifier: {classifier_accuracy:.2%} top-1 on held-out real images.", "",
        *table, "",
        "Columns: psnr / ssim / lpips of reconstructions (procedural validation images); linear_probe_top1 and "
        "knn_top1 on the bottleneck latent; zero_shot_top1 (text tower only); recon_accuracy: the domain "
        "classifier's top-1 on the tokenizer's reconstructions of real images (the ceiling of gen_accuracy); "
        "gen_accuracy: the domain "
        "classifier's top-1 on class-conditional DiT samples against the class asked for; gen_frechet: the "
        "Frechet distance between generated and real images in that classifier's feature space (FID's idea "
        "with a domain network, not FID); dit_val_loss: the DiT's flow loss on held-out latents (each "
        "tokenizer's own latents, normalized per channel: comparable in scale, not in meaning).", "",
        "## The paper's claims, checked", "", *findings(summary), "",
    ]
    paths.write_text(paths.join(workdir, "study.md"), "\n".join(text))


def plot(path: str, summary: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in summary:
        for ax, (xk, yk) in zip(axes, (("linear_probe_top1", "gen_frechet"), ("psnr", "gen_frechet"))):
            ax.errorbar(r[xk], r[yk], xerr=r[f"{xk}_std"], yerr=r[f"{yk}_std"], fmt="o", capsize=3)
            ax.annotate(r["variant"], (r[xk], r[yk]), textcoords="offset points", xytext=(5, 5))
    # gen_frechet, not gen_accuracy, on the y axes: it separates tokenizers even where the
    # classifier cannot name the class of any tokenizer's images (recon_accuracy near chance).
    axes[0].set(xlabel="understanding: linear probe top-1 (bottleneck latent)",
                ylabel="domain Frechet distance (lower: better)", title="generation vs understanding")
    axes[1].set(xlabel="reconstruction: PSNR (dB)", ylabel="domain Frechet distance (lower: better)",
                title="generation vs reconstruction")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    paths.write_bytes(path, png.getvalue())
    plt.close(fig)
