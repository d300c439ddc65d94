"""Job `study`: the paper's claim in miniature, and iREPA's rival explanation, on the same latents.

    python -m vtp_jax.main --config=configs/study_understanding.py --workdir=W   (':smoke', ':large')

VTP claims that latents shaped by understanding (CLIP, SSL) make diffusion models generate better,
and that this keeps improving with tokenizer compute while a reconstruction-only autoencoder
stagnates. iREPA (arXiv 2512.10794) found that the spatial structure of a representation, not its
global semantic accuracy, predicts generation. For every seed, tokenizer variant (AE:
reconstruction only; CLIP+AE; SSL+AE; VTP: all three) and tokenizer compute budget (multiples of
the template's steps):

1. pre-train the tokenizer on one-object procedural scenes (job `pretrain`,
   W/runs/<variant>_x<budget>_s<seed>/tokenizer; its W/.../cost.json has the FLOPs spent);
2. evaluate it (job `eval`): reconstruction; global semantics (linear probe and kNN on the
   bottleneck latent, zero-shot with a text tower); spatial structure and channel statistics of
   the latent (evals/latent_structure.py: iREPA's LDS / CDS / RMSC, effective rank);
3. train one class-conditional DiT recipe on its normalised latents (job `dit`) and score its
   samples with a domain classifier trained here on real rendered images: the accuracy against
   the class asked for (and per factor: colour is low-level, shape is the semantic part), with a
   95% bootstrap interval over samples; a Frechet distance in the classifier's feature space; the
   DiT's flow loss on held-out latents. The classifier's accuracy on the tokenizer's
   reconstructions of real images is the ceiling a perfect DiT could reach.

Every stage is one of the project's jobs through the shared runner, so a rerun resumes where it
stopped. Writes W/study.csv (one row per tokenizer and budget: the mean over seeds and its spread),
W/study_runs.csv (every run), W/study.md (the table and the claims checked), W/study.png (the
three figures) and W/samples.png (every tokenizer's sample grid).
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
from vtp_jax.evals.generation import class_accuracies
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
LABELS = {"ae": "AE", "clip_ae": "CLIP+AE", "ssl_ae": "SSL+AE", "vtp": "VTP"}
COLUMNS = ("tokenizer_flops", "psnr", "ssim", "lpips", "linear_probe_top1", "knn_top1", "zero_shot_top1",
           "lds", "cds", "rmsc", "channel_std_spread", "effective_rank",
           "recon_accuracy", "recon_shape_accuracy", "gen_accuracy", "gen_shape_accuracy", "gen_color_accuracy",
           "gen_frechet", "dit_val_loss")
BOOTSTRAPPED = ("gen_accuracy", "gen_shape_accuracy", "gen_color_accuracy")  # with 95% intervals (_lo, _hi)
CHANCE = 1 / 64  # the domain classifier's 64 (colour, shape) classes


def default_config() -> ml_collections.ConfigDict:
    """Which tokenizers, the job templates every run derives from (a pretrain and a dit config),
    the evaluators, the domain classifier."""
    c = config_lib.base_config("study")
    c.study = default_study()
    return c


def default_study() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.variants = ("ae", "vtp")
    c.budgets = (1, 4)  # tokenizer compute: multiples of tokenizer.train.steps (each its own annealed run)
    c.seeds = (0,)
    c.tokenizer = pretrain.default_config()  # each run sets objectives, steps and the seed
    c.dit = dit.default_config()  # latents.tokenizer and the seed are set per run
    c.evals = ml_collections.ConfigDict()  # run on every tokenizer (job 'eval')
    c.classifier = ml_collections.ConfigDict()
    c.classifier.seed = 100  # procedural streams 100 (train) and 101 (validation): unseen elsewhere
    c.classifier.num_train, c.classifier.num_val = 8192, 2048
    c.classifier.image_size = 64  # rendered at the tokenizers' size (the network's stem strides to 32)
    c.classifier.width = 16
    c.classifier.steps, c.classifier.batch_size, c.classifier.lr = 600, 64, 3e-3  # ~98% top-1, ~1 CPU-min
    # Gaussian blur of a random sigma in [0, max_blur] px (and faint noise) on the training images:
    # the classifier judges colour and shape, not sharpness, so a decoder's softer edges do not
    # read as another class (measured: 34% -> 43% on a 300-step tokenizer's reconstructions).
    c.classifier.max_blur = 2.0
    # Below this top-1 on held-out real images the classifier's scores would measure the classifier,
    # not the generator: the study stops with what to change rather than fill a table with them.
    c.classifier.min_accuracy = 0.9
    return c


def validate(config: ml_collections.ConfigDict, n_batch_shards: int = 1, n_processes: int = 1) -> list[str]:
    s, errs = config.study, []
    bad = [v for v in s.variants if v not in VARIANTS]
    if bad:
        errs.append(f"study.variants {bad} unknown: expected some of {sorted(VARIANTS)}")
    if not s.seeds:
        errs.append("study.seeds is empty")
    if not s.budgets or any(not isinstance(b, int) or b < 1 for b in s.budgets):
        errs.append(f"study.budgets={tuple(s.budgets)}: positive integers (multiples of tokenizer.train.steps)")
    return errs


# ------------------------------------------------------------------------------------------------
# The domain classifier.
# ------------------------------------------------------------------------------------------------
def _render(seed: int, n: int, size: int, sizes=tuple(procedural.SIZES)):
    examples = [procedural.render_example(seed, i, size, max_objects=1, sizes=tuple(sizes)) for i in range(n)]
    return (np.stack([e["image"] for e in examples]).astype(np.float32) / 255,
            np.array([e["label"] for e in examples], np.int32))


def _random_blur(x, key, max_sigma: float):
    """Separable Gaussian blur of each image with its own sigma in [0, max_sigma], edge-padded."""
    k = jnp.arange(-3, 4, dtype=jnp.float32)
    sigma = jax.random.uniform(key, (x.shape[0],), maxval=max_sigma)
    w = jnp.exp(-0.5 * (k[None] / jnp.maximum(sigma[:, None], 1e-3)) ** 2)
    w = (w / w.sum(-1, keepdims=True))[:, :, None, None, None]
    pad = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)), mode="edge")
    rows = sum(w[:, i] * pad[:, :, i:i + x.shape[2]] for i in range(7))
    return sum(w[:, i] * rows[:, i:i + x.shape[1]] for i in range(7))


def train_classifier(c: ml_collections.ConfigDict, folder: str, sizes=tuple(procedural.SIZES)) -> tuple[str, float]:
    """Trains (or reloads) the domain classifier on one-object scenes with objects of `sizes`;
    returns (params file, accuracy on held-out real images), or a ConfigError when that accuracy
    is below c.min_accuracy."""
    path, info = paths.join(folder, "classifier.msgpack"), paths.join(folder, "classifier.json")
    if not (paths.isfile(path) and paths.isfile(info)):
        params, accuracy, num_val = _fit_classifier(c, sizes)
        paths.makedirs(folder)
        paths.write_bytes(path, serialization.msgpack_serialize(params))
        paths.write_json(info, {"accuracy": accuracy, "num_val": num_val})
    accuracy = paths.read_json(info)["accuracy"]
    if accuracy < c.min_accuracy:
        raise runner.ConfigError(
            f"study.classifier: {accuracy:.1%} top-1 on held-out real images ({info}), below "
            f"study.classifier.min_accuracy={c.min_accuracy}: its scores would not measure the generator; "
            f"train it longer (study.classifier.steps, num_train) and delete {folder}")
    return path, accuracy


def _fit_classifier(c: ml_collections.ConfigDict, sizes):
    """The classifier trained on c.num_train rendered images: (params, held-out accuracy, num_val)."""
    net = DomainClassifier(64, c.width)
    x, y = _render(c.seed, c.num_train, c.image_size, sizes)
    xv, yv = _render(c.seed + 1, c.num_val, c.image_size, sizes)
    params = net.init(jax.random.key(c.seed), x[:1])["params"]
    params = jax.tree.map(lambda b: b.value if hasattr(b, "value") else b, params,
                          is_leaf=lambda b: hasattr(b, "value"))
    tx = optax.adam(optax.cosine_decay_schedule(c.lr, c.steps))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, xb, yb, key):
        if c.max_blur > 0:
            k_blur, k_noise = jax.random.split(key)
            xb = _random_blur(xb, k_blur, c.max_blur) + 0.02 * jax.random.normal(k_noise, xb.shape)

        def loss(p):
            logits, _ = net.apply({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        g = jax.grad(loss)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt

    rng = np.random.default_rng(c.seed)
    for i in range(c.steps):
        idx = rng.integers(0, len(x), c.batch_size)
        params, opt = step(params, opt, x[idx], y[idx], jax.random.key(i))
    predict = jax.jit(lambda p, xb: jnp.argmax(net.apply({"params": p}, xb)[0], -1))
    correct = sum(int(np.sum(np.asarray(predict(params, xv[i:i + 256])) == yv[i:i + 256]))
                  for i in range(0, len(xv), 256))
    accuracy = correct / len(xv)
    logging.info("domain classifier: %.4f top-1 on %d held-out real images", accuracy, len(xv))
    return jax.device_get(params), accuracy, len(xv)


def reconstruction_accuracy(export: str, classifier: str, seed: int, n: int, size: int,
                            sizes=tuple(procedural.SIZES)) -> dict:
    """The domain classifier on a tokenizer's reconstructions of n real images ('accuracy' and per
    factor): the ceiling of gen_accuracy (a DiT that matched the latent distribution exactly would
    decode to images like these)."""
    params = serialization.msgpack_restore(paths.read_bytes(classifier))
    net = DomainClassifier(64, params["conv0_0"]["kernel"].shape[-1])
    tokenizer = load_pretrained(export)
    x, y = _render(seed, n, size, sizes)
    predicted = []
    for i in range(0, n, 64):
        rec = images.denormalize(tokenizer.decode(tokenizer.encode(images.normalize(255 * x[i:i + 64]))))
        logits, _ = net.apply({"params": params}, jnp.floor(255 * jnp.clip(rec, 0, 1)) / 255)
        predicted.append(np.argmax(np.asarray(logits), -1))
    return class_accuracies(np.concatenate(predicted), y, net.num_colors)


# ------------------------------------------------------------------------------------------------
# The runs.
# ------------------------------------------------------------------------------------------------
def run_name(variant: str, budget: int, seed: int) -> str:
    return f"{variant}_x{budget}_s{seed}"


def tokenizer_config(s, variant: str, budget: int, seed: int):
    c = s.tokenizer.copy_and_resolve_references()
    c.objectives.l_clip, c.objectives.l_ssl = VARIANTS[variant]
    if variant == "ae":  # reconstruction only: it reconstructs every image of the step, not a sub-batch
        c.data.batch_rec = c.data.batch_clip
    c.train.steps *= budget  # checkpoints every template's checkpoint_every: a full study spans sessions
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


def run_one(s, variant: str, budget: int, seed: int, classifier: str, root: str) -> dict:
    """One tokenizer through pre-training, evaluation, latents and its DiT; returns its row, also
    kept as W/runs/<name>/row.json: a run with a row is done (the row and its sample grid are all
    a later session needs to resume a study whose workdir is gone)."""
    name = run_name(variant, budget, seed)
    d = paths.join(root, "runs", name)
    row_file = paths.join(d, "row.json")
    if paths.isfile(row_file):
        return paths.read_json(row_file)
    t0 = time.time()
    tok_dir, eval_dir, dit_dir = (paths.join(d, n) for n in ("tokenizer", "eval", "dit"))
    if not paths.isdir(paths.join(tok_dir, "export")):
        runner.run(pretrain, tokenizer_config(s, variant, budget, seed), tok_dir)
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
        paths.write_json(ceiling, reconstruction_accuracy(export, classifier, held_out, s.classifier.num_val,
                                                          s.tokenizer.data.image_size, s.tokenizer.data.procedural_sizes))
    ev, gen = paths.read_json(paths.join(eval_dir, "metrics.json")), paths.read_json(paths.join(dit_dir, "metrics.json"))
    rec, cost = paths.read_json(ceiling), paths.read_json(paths.join(tok_dir, "cost.json"))
    grids = sorted(paths.listdir(paths.join(dit_dir, "samples")))
    paths.write_bytes(paths.join(root, f"samples_{name}.png"), paths.read_bytes(paths.join(dit_dir, "samples", grids[-1])))
    g = "generation_classes/"
    row = {"variant": variant, "budget": budget, "seed": seed,
           "tokenizer_flops": cost["flops_per_step"] * cost["steps"],
           "psnr": ev["psnr"], "ssim": ev["ssim"], "lpips": ev.get("lpips", np.nan),
           "linear_probe_top1": ev["linear_probe/top1"], "knn_top1": ev["knn/top1"],
           "zero_shot_top1": ev.get("zero_shot/top1", np.nan),  # no text tower: not measurable
           **{k: ev[f"latent_structure/{k}"] for k in ("lds", "cds", "rmsc", "channel_std_spread", "effective_rank")},
           "recon_accuracy": rec["accuracy"], "recon_shape_accuracy": rec["shape_accuracy"],
           "gen_frechet": gen[g + "frechet"], "dit_val_loss": gen["val_loss/loss"]}
    for k in BOOTSTRAPPED:
        name_in = k.replace("gen_", "")
        row[k], row[f"{k}_lo"], row[f"{k}_hi"] = (gen.get(g + name_in + sfx, np.nan) for sfx in ("", "_lo", "_hi"))
    row["minutes"] = (time.time() - t0) / 60
    paths.write_json(row_file, row)
    return row


def make_job(config: ml_collections.ConfigDict, mesh, workdir: str | None = None, abstract: bool = False) -> runner.Job:
    if abstract:  # no train step: nothing for the compile plan to compile
        return runner.Job(config=config, init=None)
    return runner.Job(config=config, init=None, run=lambda: run(config, workdir))


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    s = config.study
    paths.makedirs(workdir)
    if not jax.config.jax_compilation_cache_dir:  # the runs compile many identical programs: once is enough
        jax.config.update("jax_compilation_cache_dir", paths.join(workdir, "compile_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    t0 = time.time()
    classifier, accuracy = train_classifier(s.classifier, paths.join(workdir, "classifier"),
                                            s.tokenizer.data.procedural_sizes)
    rows = [run_one(s, v, b, seed, classifier, workdir) for seed in s.seeds for b in s.budgets for v in s.variants]
    write_outputs(workdir, rows, accuracy, (time.time() - t0) / 60, config)
    return rows


# ------------------------------------------------------------------------------------------------
# Outputs.
# ------------------------------------------------------------------------------------------------
def n_items(s: ml_collections.ConfigDict) -> dict[str, int]:
    """How many items each accuracy column was measured on (what its sampling noise depends on)."""
    out = {}
    if "generation_classes" in s.dit.evals:
        n_gen = s.dit.evals.generation_classes.samples_per_class * len(procedural.CLASS_NAMES)
        out.update(gen_accuracy=n_gen, gen_shape_accuracy=n_gen, gen_color_accuracy=n_gen)
    for name in ("linear_probe", "knn", "zero_shot"):
        if name in s.evals:
            out[f"{name}_top1"] = s.evals[name].data.num_images
    out["recon_accuracy"] = out["recon_shape_accuracy"] = s.classifier.num_val
    return out


class Bootstrap:
    """Two-level bootstrap of the study's cells (variant, budget): each draw resamples a cell's
    seeds with replacement and, for an accuracy, the n items each seed's run measured it on (a
    binomial draw of its count of correct items: all that resampling those items changes). A
    cell's 95% interval thus holds tokenizer-training noise (seeds) and sampling noise together;
    differences of cells and correlations across cells are taken draw by draw."""

    def __init__(self, rows: list[dict], n: dict[str, int] | None = None, draws: int = 4000, seed: int = 0):
        self.cells = list(dict.fromkeys((r["variant"], r["budget"]) for r in rows))
        self.runs = {c: [r for r in rows if (r["variant"], r["budget"]) == c] for c in self.cells}
        self.n, self.draws, self.seed = n or {}, draws, seed
        rng = np.random.default_rng(seed)
        self.pick = {c: rng.integers(0, len(self.runs[c]), (draws, len(self.runs[c]))) for c in self.cells}
        self._draws = {}

    def mean(self, cell, key) -> float:
        return float(np.mean([float(r[key]) for r in self.runs[cell]]))

    def of(self, cell, key) -> np.ndarray:
        """(draws,) bootstrap replicates of the cell's mean of `key`."""
        if (cell, key) not in self._draws:
            values = np.array([float(r[key]) for r in self.runs[cell]])[self.pick[cell]]  # (draws, seeds)
            if self.n.get(key) and np.all(np.isfinite(values)):
                rng = np.random.default_rng([self.seed, self.cells.index(cell), sum(map(ord, key))])
                values = rng.binomial(self.n[key], np.clip(values, 0, 1)) / self.n[key]
            self._draws[cell, key] = values.mean(1)
        return self._draws[cell, key]

    def interval(self, cell, key) -> tuple[float, float]:
        return tuple(float(q) for q in np.percentile(self.of(cell, key), [2.5, 97.5]))

    def difference(self, a, b, key) -> tuple[float, float, float]:
        """(mean of a - mean of b, 95% interval) for two cells, or two differences of cells."""
        d = self._combine(a, key) - self._combine(b, key)
        return (self._point(a, key) - self._point(b, key), *(float(q) for q in np.percentile(d, [2.5, 97.5])))

    def _combine(self, x, key):  # a cell, or ("-", cell, cell): their difference, draw by draw
        return self.of(x[1], key) - self.of(x[2], key) if x[0] == "-" else self.of(x, key)

    def _point(self, x, key):
        return self.mean(x[1], key) - self.mean(x[2], key) if x[0] == "-" else self.mean(x, key)

    def correlation(self, key: str, target: str = "gen_accuracy") -> tuple[float, float, float] | None:
        """Pearson r of the cells' means of `key` and `target`, and its 95% interval: each draw
        resamples the cells themselves (which tokenizers were trained) as well as their seeds
        and items. None when either does not vary or is not measured everywhere."""
        x = np.array([self.mean(c, key) for c in self.cells])
        y = np.array([self.mean(c, target) for c in self.cells])
        if not (np.all(np.isfinite(x)) and np.std(x) > 0 and np.std(y) > 0):
            return None
        xs = np.stack([self.of(c, key) for c in self.cells], 1)  # (draws, cells)
        ys = np.stack([self.of(c, target) for c in self.cells], 1)
        which = np.random.default_rng(self.seed + 1).integers(0, len(self.cells), (self.draws, len(self.cells)))
        xs, ys = np.take_along_axis(xs, which, 1), np.take_along_axis(ys, which, 1)
        xc, yc = xs - xs.mean(1, keepdims=True), ys - ys.mean(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (xc * yc).sum(1) / np.sqrt((xc ** 2).sum(1) * (yc ** 2).sum(1))
        r = r[np.isfinite(r)]  # a draw of identical cells has no correlation
        return float(np.corrcoef(x, y)[0, 1]), *(float(q) for q in np.percentile(r, [2.5, 97.5]))


def summarize(rows: list[dict], n: dict[str, int] | None = None) -> list[dict]:
    """One row per (variant, budget): the mean over seeds of every column and its std (0 for one
    seed); the accuracies of generation with their two-level 95% intervals (`Bootstrap`)."""
    boot = Bootstrap(rows, n)
    out = []
    for cell in boot.cells:
        runs = boot.runs[cell]
        row = {"variant": cell[0], "budget": cell[1], "seeds": len(runs)}
        for k in COLUMNS:
            vals = np.array([float(r[k]) for r in runs], np.float64)
            row[k], row[f"{k}_std"] = float(np.mean(vals)), float(np.std(vals))
        for k in BOOTSTRAPPED:
            row[f"{k}_lo"], row[f"{k}_hi"] = boot.interval(cell, k)
        out.append(row)
    return out


def _verdict(lo: float, hi: float) -> str:
    """'held' when an interval of a difference lies above 0, 'did NOT hold' below, else 'not separated'."""
    return "held" if lo > 0 else ("did NOT hold" if hi < 0 else "not separated")


DIAGNOSTICS = ("linear_probe_top1", "knn_top1", "zero_shot_top1", "lds", "cds", "rmsc", "effective_rank",
               "channel_std_spread", "psnr")


def findings(rows: list[dict], n: dict[str, int] | None = None) -> list[str]:
    """The paper's claims and iREPA's, checked on every run with two-level 95% intervals (seeds
    and samples together): a claim about a difference holds when the interval of the difference
    excludes 0 on its side."""
    boot = Bootstrap(rows, n)
    have = set(boot.cells)
    budgets = sorted({c[1] for c in have})
    lines = []

    def diff(claim, a, b, key="gen_accuracy"):
        d, lo, hi = boot.difference(a, b, key)
        lines.append(f"- {claim}: **{_verdict(lo, hi)}** ({key} difference {d:+.3f} [{lo:+.3f}, {hi:+.3f}]).")

    seeds = sorted({len(r) for r in boot.runs.values()})
    ceiling = max(boot.mean(c, "recon_accuracy") for c in have)
    lines.append(f"- Ceiling: the domain classifier recognises at best {ceiling:.1%} of a tokenizer's reconstructions "
                 f"of real images (chance {CHANCE:.1%}); gen_accuracy can only separate tokenizers below that. "
                 f"Seeds per cell: {', '.join(map(str, seeds))}.")
    for b in budgets:
        for v in ("clip_ae", "ssl_ae", "vtp"):
            if (v, b) in have and ("ae", b) in have:
                diff(f"{LABELS[v]}'s latents generate the requested object better than the AE's at {b}x compute",
                     (v, b), ("ae", b))
        if ("vtp", b) in have and ("ae", b) in have:
            diff(f"... VTP's, the shape (the semantic factor) at {b}x", ("vtp", b), ("ae", b), "gen_shape_accuracy")
            diff(f"VTP's latent is more linearly separable than the AE's at {b}x", ("vtp", b), ("ae", b),
                 "linear_probe_top1")
    if len(budgets) > 1:
        lo, hi = budgets[0], budgets[-1]
        for v in VARIANTS:
            if (v, lo) in have and (v, hi) in have:
                claim = f"{LABELS[v]}'s generation improves from {lo}x to {hi}x compute"
                diff(claim + (" (the paper: the AE stagnates)" if v == "ae" else ""), (v, hi), (v, lo))
        for v in ("clip_ae", "ssl_ae", "vtp"):
            if all(c in have for c in ((v, lo), (v, hi), ("ae", lo), ("ae", hi))):
                diff(f"the {LABELS[v]} - AE gap grows with compute (the paper: understanding pays more as compute "
                     "grows)", ("-", (v, hi), ("ae", hi)), ("-", (v, lo), ("ae", lo)))
    if len(have) > 2:
        rs = {k: boot.correlation(k) for k in DIAGNOSTICS if k in rows[0]}
        rs = {k: v for k, v in rs.items() if v is not None}
        if rs:
            lines.append(f"- Across the {len(have)} tokenizer cells, Pearson r with gen_accuracy [95% interval, cells, "
                         "seeds and samples resampled]: " + ", ".join(
                             f"{k} {r:+.2f} [{lo:+.2f}, {hi:+.2f}]" for k, (r, lo, hi) in rs.items()) + ".")
            best = max(rs, key=lambda k: abs(rs[k][0]))
            r, lo, hi = rs[best]
            lines.append(f"- The best predictor of generation here: **{best}** (r {r:+.2f} [{lo:+.2f}, {hi:+.2f}]; its "
                         f"interval {'excludes' if lo > 0 or hi < 0 else 'includes'} 0).")
        claim = "- iREPA's claim, spatial structure predicts generation better than global semantics: "
        if "lds" in rs and "linear_probe_top1" in rs:
            d = _abs_r_difference(boot, "lds", "linear_probe_top1")
            lines.append(claim + f"**{_verdict(d[1], d[2])}** here (|r| LDS {abs(rs['lds'][0]):.2f} vs linear probe "
                         f"{abs(rs['linear_probe_top1'][0]):.2f}; |r| difference {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]).")
        else:
            lines.append(claim + "cannot be judged: gen_accuracy, LDS or the linear probe does not vary across "
                         "these tokenizers.")
    return lines


def _abs_r_difference(boot: Bootstrap, a: str, b: str) -> tuple[float, float, float]:
    """|r(a, gen)| - |r(b, gen)| across the cells, with its 95% interval (the same draws for both)."""
    cells = boot.cells
    which = np.random.default_rng(boot.seed + 2).integers(0, len(cells), (boot.draws, len(cells)))
    y = np.take_along_axis(np.stack([boot.of(c, "gen_accuracy") for c in cells], 1), which, 1)

    def r_of(key):
        x = np.take_along_axis(np.stack([boot.of(c, key) for c in cells], 1), which, 1)
        xc, yc = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.abs((xc * yc).sum(1) / np.sqrt((xc ** 2).sum(1) * (yc ** 2).sum(1)))

    d = r_of(a) - r_of(b)
    d = d[np.isfinite(d)]
    point = abs(boot.correlation(a)[0]) - abs(boot.correlation(b)[0])
    return point, *(float(q) for q in np.percentile(d, [2.5, 97.5]))


def _name(variant: str, budget: int) -> str:
    return f"{LABELS.get(variant, variant)} {budget}x"


def _write_csv(path, rows):
    """NaN (a metric a tokenizer cannot have: zero-shot without a text tower) is written 'n/a'."""
    def cell(v):
        return "n/a" if isinstance(v, float) and np.isnan(v) else v

    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows({k: cell(v) for k, v in r.items()} for r in rows)
    paths.write_text(path, text.getvalue())


def write_outputs(workdir: str, rows: list[dict], classifier_accuracy: float, minutes: float, config):
    s = config.study
    n = n_items(s)
    summary = summarize(rows, n)
    _write_csv(paths.join(workdir, "study_runs.csv"), rows)
    _write_csv(paths.join(workdir, "study.csv"), summary)
    plot(paths.join(workdir, "study.png"), summary)
    plot_samples(workdir, [run_name(r["variant"], r["budget"], s.seeds[0]) for r in summary],
                 [_name(r["variant"], r["budget"]) for r in summary],
                 [procedural.CLASS_NAMES[k] for k in dit.grid_labels(s.dit.dit.sample, len(procedural.CLASS_NAMES))])
    shown = ("tokenizer_flops", "psnr", "linear_probe_top1", "knn_top1", "zero_shot_top1", "lds", "effective_rank",
             "recon_accuracy", "gen_accuracy", "gen_shape_accuracy", "gen_color_accuracy", "gen_frechet", "dit_val_loss")

    def cell(r, k):
        if np.isnan(r[k]):
            return "n/a"
        if k in BOOTSTRAPPED:
            return f"{r[k]:.3f} [{r[k + '_lo']:.3f}, {r[k + '_hi']:.3f}]"
        return f"{r[k]:.4g}" + (f" ± {r[f'{k}_std']:.2g}" if r["seeds"] > 1 else "")

    table = ["| tokenizer | " + " | ".join(shown) + " |", "|" + "---|" * (len(shown) + 1)]
    table += [f"| {_name(r['variant'], r['budget'])} | " + " | ".join(cell(r, k) for k in shown) + " |" for r in summary]
    text = [
        "# The miniature study: understanding, spatial structure and generation", "",
        f"{len(s.seeds)} seed(s) x {len(s.variants)} tokenizers x {len(s.budgets)} compute budgets "
        f"({', '.join(f'{b}x' for b in s.budgets)} of {s.tokenizer.train.steps} steps), {minutes:.0f} min in all. "
        f"Domain classifier: {classifier_accuracy:.2%} top-1 on held-out real images (chance {CHANCE:.1%}). "
        "gen_* columns: mean over seeds [95% interval of a two-level bootstrap: "
        + ("the seeds, and " if len(s.seeds) > 1 else "") + "the samples each run drew]; other columns: mean"
        + (" ± std over seeds" if len(s.seeds) > 1 else "") + ".", "",
        *table, "",
        "Columns: tokenizer_flops: matmul FLOPs of the tokenizer's training (steps x per-step cost); psnr of "
        "reconstructions; linear_probe_top1 / knn_top1 on the bottleneck latent (global semantics); "
        "zero_shot_top1 (text tower only); lds: iREPA's local-vs-distant similarity of the latent's tokens "
        "(spatial structure; cds, rmsc in study.csv); effective_rank of the latent; recon_accuracy: the domain "
        "classifier on the tokenizer's reconstructions of real images (the ceiling of gen_accuracy); "
        "gen_accuracy: the classifier's top-1 on class-conditional DiT samples against the class asked for "
        "(shape and colour separately); gen_frechet: Frechet distance to real images in the classifier's "
        "feature space; dit_val_loss: flow loss on held-out latents (each tokenizer's own normalised "
        "latents: comparable in scale, not in meaning).", "",
        "## The claims, checked", "", *findings(rows, n), "",
    ]
    paths.write_text(paths.join(workdir, "study.md"), "\n".join(text))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    paths.write_bytes(path, png.getvalue())


def plot(path: str, summary: list[dict]):
    """Generation against global semantics, against spatial structure and against tokenizer
    compute: one point per tokenizer, 95% intervals on gen_accuracy, seed spread on x."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {v: f"C{i}" for i, v in enumerate(VARIANTS)}
    panels = (("linear_probe_top1", "global semantics: linear probe top-1 on the latent"),
              ("lds", "spatial structure: LDS of the latent (iREPA)"),
              ("tokenizer_flops", "tokenizer training compute (FLOPs)"))
    for ax, (xk, xlabel) in zip(axes, panels):
        for r in summary:
            lo, hi = r["gen_accuracy_lo"], r["gen_accuracy_hi"]
            ax.errorbar(r[xk], r["gen_accuracy"], xerr=r[f"{xk}_std"],
                        yerr=[[r["gen_accuracy"] - lo], [hi - r["gen_accuracy"]]],
                        fmt="o", capsize=3, color=colors.get(r["variant"]))
            ax.annotate(_name(r["variant"], r["budget"]), (r[xk], r["gen_accuracy"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)
        ax.axhline(CHANCE, color="grey", lw=0.8, ls=":")
        ax.set(xlabel=xlabel, ylabel="gen_accuracy (95% interval)")
    for v in dict.fromkeys(r["variant"] for r in summary):  # the compute trend of each variant
        pts = sorted((r["tokenizer_flops"], r["gen_accuracy"]) for r in summary if r["variant"] == v)
        axes[2].plot(*zip(*pts), color=colors.get(v), lw=1, label=LABELS.get(v, v))
    axes[2].set_xscale("log")
    axes[2].legend(fontsize=8)
    axes[0].set_title("generation vs understanding")
    axes[1].set_title("generation vs spatial structure")
    axes[2].set_title("generation vs tokenizer compute")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_samples(workdir: str, names: list[str], titles: list[str], rows: list[str]):
    """W/samples.png: every tokenizer's last DiT sample grid side by side, rows named by the class
    they were asked for."""
    from PIL import Image

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1, 3.6), squeeze=False)
    for i, (ax, name, title) in enumerate(zip(axes[0], names, titles)):
        with paths.open_file(paths.join(workdir, f"samples_{name}.png")) as f:
            grid = np.asarray(Image.open(f).convert("RGB"))
        ax.imshow(grid)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks((np.arange(len(rows)) + 0.5) * grid.shape[0] / len(rows), rows if i == 0 else [], fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    small = io.BytesIO()  # a 256-colour palette: the same picture at a quarter of the bytes
    Image.open(png).convert("RGB").quantize(colors=256).save(small, format="png", optimize=True)
    paths.write_bytes(paths.join(workdir, "samples.png"), small.getvalue())
