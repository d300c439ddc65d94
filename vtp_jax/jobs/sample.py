"""Job `sample`: N class-conditional samples of a trained DiT, in the file FID evaluators read.

    python -m vtp_jax.main --config=configs/sample.py --config.sample.checkpoint=DIR \\
      --config.sample.num_samples=N --workdir=W

`sample.checkpoint` is a `dit` workdir (its config.json and the EMA params of its newest checkpoint
that verifies) or an official LightningDiT checkpoint file (a .pt / .pth / .ckpt state dict, its
`ema` entry first; or the same state dict as .safetensors / .npz), converted by
`vtp_jax.checkpoints.lightningdit`. The samples come from the DiT job's `Generator` (the ODE sampler,
classifier-free guidance, the inverse latent normalisation and the tokenizer's pixel decoder) with
the DiT workdir's dit.sample settings unless `sample` overrides them (an official checkpoint: the
dit job's defaults, VTP's recipe), decoded by the tokenizer the DiT's latents were extracted with
(or `sample.tokenizer`; an official checkpoint names none, so it is required there, as are its
latent statistics, `sample.latent_stats`: e.g. the release's latents_stats.pt).

Labels: 'per_class' (num_samples / num_classes of each class, in class order: the class-balanced
FID-50k protocol) or 'uniform' (uniform random classes drawn with `sample.seed`). Sample i starts
from the noise N(0, I) drawn with fold_in(key(sample.seed), i), so it is the same image whatever
the batch size, the mesh or where a run was interrupted. Batches (sample.batch_size, global) are
sharded over the mesh's batch axes on every device of every process and gathered to every process.

Part k holds samples [k * part_size, (k + 1) * part_size) as W/parts/part-<k>.npz (images uint8,
labels), written whole by process 0; a rerun skips the parts that exist (W/parts/settings.json
records what they were made with; a rerun with other settings stops rather than mix them). At
the end W/samples.npz holds arr_0 (N, H, W, 3) uint8 (truncated: floor(255 x), as the gFID
evaluator quantises) and arr_1 the (N,) labels: the layout guided-diffusion's evaluator
(evaluations/evaluator.py) reads; W/samples.png a preview grid (rows: classes).
"""
from __future__ import annotations

import functools
import io
import json
import time
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from PIL import Image

from vtp_jax import config as config_lib
from vtp_jax import images, paths, sharding
from vtp_jax.checkpoints import hub, integrity, lightningdit, released
from vtp_jax.data import files
from vtp_jax.data import latents as latents_lib
from vtp_jax.jobs import dit
from vtp_jax.train import runner

SAMPLER_FIELDS = ("num_steps", "shift", "method", "cfg_scale", "cfg_interval_start", "cfg_channels")
LABELS = ("per_class", "uniform")
METHODS = ("euler", "heun", "dopri5")
PARTS, SETTINGS, SAMPLES, PREVIEW = "parts", "settings.json", "samples.npz", "samples.png"


def default_config() -> ml_collections.ConfigDict:
    c = config_lib.base_config("sample")
    s = c.sample = ml_collections.ConfigDict()
    s.checkpoint = ""  # a dit workdir, or an official LightningDiT checkpoint file (.pt / .safetensors / .npz)
    s.num_samples = 50_000
    s.batch_size = 256  # global: split over the mesh's batch shards and the processes
    s.labels = "per_class"  # 'per_class': num_samples / num_classes of each, in order; 'uniform': random classes
    s.seed = 0  # the noise of sample i: fold_in(key(seed), i); the 'uniform' labels
    # The sampler; None = the DiT workdir's dit.sample value (an official checkpoint: the dit job's default).
    s.num_steps = ml_collections.FieldReference(None, field_type=int)
    s.shift = ml_collections.FieldReference(None, field_type=float)
    s.method = ml_collections.FieldReference(None, field_type=str)
    s.cfg_scale = ml_collections.FieldReference(None, field_type=float)
    s.cfg_interval_start = ml_collections.FieldReference(None, field_type=float)
    s.cfg_channels = ml_collections.FieldReference(None, field_type=int)  # stays None (all) unless set
    s.tokenizer = ""  # '' = the tokenizer of the DiT's latents (its config / meta.json); required for official
    s.latent_stats = ""  # '' = the DiT's latent statistics; required for official (e.g. latents_stats.pt)
    s.latent_multiplier = ml_collections.FieldReference(None, field_type=float)  # None = the DiT's (official: 1.0)
    s.part_size = 2048  # samples per resumable part (a multiple of batch_size)
    s.preview = 8  # W/samples.png: up to this many rows (classes) of this many samples; 0 = none
    return c


def is_official(checkpoint: str) -> bool:
    """An official checkpoint is a file; a dit workdir is a folder."""
    return paths.isfile(checkpoint)


def validate(config: ml_collections.ConfigDict, n_batch_shards: int, n_processes: int = 1) -> list[str]:
    s, errs = config.sample, []
    if not s.checkpoint:
        errs.append("sample.checkpoint is empty: give a dit workdir or an official LightningDiT checkpoint file "
                    "(--config.sample.checkpoint=PATH)")
    elif not paths.exists(s.checkpoint):
        errs.append(f"sample.checkpoint={s.checkpoint} does not exist")
    elif not is_official(s.checkpoint):
        missing = [n for n in ("config.json", "checkpoints") if not paths.exists(paths.join(s.checkpoint, n))]
        if missing:
            errs.append(f"sample.checkpoint={s.checkpoint} is a folder without {' or '.join(missing)}: not a dit "
                        "workdir (or give an official LightningDiT checkpoint file)")
    else:
        for field in ("tokenizer", "latent_stats"):
            if not s[field]:
                errs.append(f"sample.{field} is empty: sample.checkpoint={s.checkpoint} is an official checkpoint, "
                            f"which names no {'tokenizer' if field == 'tokenizer' else 'latent statistics'}: set "
                            f"--config.sample.{field}=" + ("DIR (a release folder or hub id)" if field == "tokenizer"
                                                            else "FILE (e.g. the release's latents_stats.pt)"))
    if s.tokenizer and not hub.is_hub_id(s.tokenizer) and not paths.isdir(s.tokenizer):
        errs.append(f"sample.tokenizer={s.tokenizer} is not a folder: give a release-format folder (a run's export/, "
                    "a released VTP), a tokenizer training workdir or a hub id")
    if s.latent_stats and not paths.exists(s.latent_stats):
        errs.append(f"sample.latent_stats={s.latent_stats} does not exist")
    if s.num_samples <= 0:
        errs.append(f"sample.num_samples={s.num_samples}: expected a number of samples > 0")
    if s.batch_size <= 0 or s.batch_size % n_batch_shards or s.batch_size % n_processes:
        errs.append(f"sample.batch_size={s.batch_size} is not a positive multiple of the {n_batch_shards} batch "
                    f"shards of the mesh and the {n_processes} process(es)")
    elif s.part_size <= 0 or s.part_size % s.batch_size:
        errs.append(f"sample.part_size={s.part_size} is not a positive multiple of sample.batch_size={s.batch_size}")
    if s.labels not in LABELS:
        errs.append(f"sample.labels={s.labels!r}: expected one of {', '.join(map(repr, LABELS))}")
    if s.method is not None and s.method not in METHODS:
        errs.append(f"sample.method={s.method!r}: expected None (the DiT's) or one of {', '.join(map(repr, METHODS))}")
    if s.num_steps is not None and s.num_steps < 2:
        errs.append(f"sample.num_steps={s.num_steps}: grid points, at least 2 (None: the DiT's)")
    if s.cfg_channels is not None and s.cfg_channels < 1:
        errs.append(f"sample.cfg_channels={s.cfg_channels}: None (all channels) or >= 1 (3: official)")
    if s.latent_multiplier is not None and s.latent_multiplier <= 0:
        errs.append(f"sample.latent_multiplier={s.latent_multiplier}: expected None (the DiT's) or > 0")
    if s.preview < 0:
        errs.append(f"sample.preview={s.preview}: expected rows >= 0 (0: no preview)")
    return errs


def make_job(config: ml_collections.ConfigDict, mesh, workdir: str | None = None, abstract: bool = False) -> runner.Job:
    if abstract:  # no train step: nothing for the compile plan to compile
        return runner.Job(config=config, init=None)
    if workdir is None:
        raise runner.ConfigError("the sample job writes W/samples.npz: run it with a workdir")
    return runner.Job(config=config, init=None, run=lambda: sample(config, workdir, mesh))


# ------------------------------------------------------------------------------------------------
# The DiT, its decoder and its settings.
# ------------------------------------------------------------------------------------------------
def restore_ema_params(workdir: str, mesh):
    """(step, EMA params replicated over `mesh`) of a dit workdir's newest checkpoint whose EMA
    params read back and match their checksums; only the EMA params are read (partial restore)."""
    folder = paths.join(workdir, "checkpoints")
    steps = sorted(ocp.CheckpointManager(folder).all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{folder} holds no checkpoint: sample.checkpoint={workdir} is not a trained dit "
                                "workdir")
    replicated, problems = sharding.replicated(mesh), []
    for step in steps:
        path = paths.join(folder, str(step), "state")
        try:
            meta = ocp.StandardCheckpointer().metadata(path)
            tree = getattr(meta, "item_metadata", meta)
            tree = getattr(tree, "tree", tree)
            if "ema_params" not in tree:
                raise released.CheckpointError(f"{path} holds no ema_params ({sorted(tree)}): not a dit checkpoint")
            target = {"ema_params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
                                                 tree["ema_params"])}
            out = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
        except released.CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001  orbax / TensorStore raise many types on damaged files
            said = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            problems.append(f"step {step}: cannot be read ({said})")
            logging.error("sample: checkpoint %s", problems[-1])
            continue
        problem = _verify_ema(paths.join(folder, str(step)), out)
        if problem is None:
            if problems:
                logging.warning("sample: using step %d of %s (newer steps unusable)", step, workdir)
            return step, out["ema_params"]
        problems.append(f"step {step}: {problem}")
        logging.error("sample: checkpoint %s", problems[-1])
    raise released.CheckpointError(f"no checkpoint in {folder} has usable EMA params ({'; '.join(problems)})")


def _verify_ema(step_dir: str, restored: dict) -> str | None:
    """The EMA params against the checksums saved with the step (those of its ema_params leaves)."""
    path = paths.join(step_dir, integrity.INTEGRITY, "metadata")
    if not paths.isfile(path):
        logging.warning("sample: %s has no checksums (written before they existed): EMA params unverified", step_dir)
        return None
    try:
        stored = paths.read_json(path)
    except (OSError, ValueError) as e:
        return f"its checksums cannot be read ({e})"
    want = {k: v for k, v in stored.get("checksums", {}).items() if k.startswith("ema_params.")}
    return integrity.verify(restored, {"checksums": want})


def read_official_state_dict(path: str) -> dict[str, np.ndarray]:
    """An official LightningDiT state dict from a .safetensors or .npz file or a torch.save
    checkpoint (.pt and anything else: its `ema`, else `model`, else the file), each read by the
    checked readers of vtp_jax.data.files (no torch, no pickle code)."""
    name = path.lower()
    if name.endswith(".safetensors"):
        return files.read_safetensors(path, float_dtype=np.float32)
    if name.endswith(".npz"):
        with files.NpzArchive(path) as f:
            return {k: f[k] for k in f.files}
    return lightningdit.read_torch_checkpoint(path)


def dit_config_of(workdir: str) -> ml_collections.ConfigDict:
    """The dit job's config a workdir was trained with: today's schema, the run's values."""
    path = paths.join(workdir, "config.json")
    saved = paths.read_json(path)
    if not isinstance(saved, dict) or saved.get("job", "dit") != "dit" or "dit" not in saved:
        job = saved.get("job") if isinstance(saved, dict) else None
        raise runner.ConfigError(f"sample.checkpoint={workdir} is a workdir of job {job!r}, not 'dit'")
    return config_lib.read_saved(path, dit.default_config(), ("seed", "dit"))


def _latents_meta(c: ml_collections.ConfigDict, workdir: str) -> dict:
    """meta.json of the DiT's latents; a folder that moved with its workdir (W/latents) is found there."""
    folder = c.dit.latents
    if not (paths.isfile(paths.join(folder, latents_lib.META)) or latents_lib.is_official(folder)):
        moved = paths.join(workdir, "latents")
        if paths.isfile(paths.join(moved, latents_lib.META)):
            logging.info("sample: the DiT's latents %s are gone; using %s", folder, moved)
            c.dit.latents = folder = moved
    try:
        return latents_lib.read_meta(folder)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"the latents of sample.checkpoint={workdir} (dit.latents={folder}) are needed for "
                                f"their shape, classes and tokenizer: {e}") from None


def load(config: ml_collections.ConfigDict, mesh) -> tuple[dit.Generator, object, dict]:
    """(the Generator, the DiT params replicated over the mesh, the settings the samples are made
    with) for config.sample."""
    s = config.sample
    if is_official(s.checkpoint):
        pre = lightningdit.load_lightningdit(read_official_state_dict(s.checkpoint))
        model, params = pre.model, jax.device_put(pre.params, sharding.replicated(mesh))
        c = dit.default_config()
        c.dit.latents, multiplier, step = "", 1.0, None
        meta = dict(shape=[model.input_size, model.input_size, model.in_channels], num_classes=model.num_classes,
                    tokenizer="")
    else:
        c = dit_config_of(s.checkpoint)
        meta = _latents_meta(c, s.checkpoint)
        model = dit.model_from(c, meta)
        step, params = restore_ema_params(s.checkpoint, mesh)
        multiplier = c.dit.latent_multiplier
    if s.tokenizer:
        c.dit.tokenizer = s.tokenizer
    if s.latent_stats:
        c.dit.latent_stats = s.latent_stats
    if s.latent_multiplier is not None:
        multiplier = s.latent_multiplier
    sampler = c.dit.sample.copy_and_resolve_references()
    for k in SAMPLER_FIELDS:
        if s[k] is not None:
            sampler[k] = s[k]
    mean, std, tok_model, tok_params = dit.load_generator_parts(c, meta, mesh)
    if tok_model.config.latent_dim != model.in_channels:
        raise runner.ConfigError(f"the tokenizer {c.dit.tokenizer or meta['tokenizer']} has "
                                 f"{tok_model.config.latent_dim}-channel latents, the DiT of "
                                 f"sample.checkpoint={s.checkpoint} {model.in_channels}")
    generator = dit.Generator(model, sampler, mean, std, multiplier, tok_model, tok_params, latent_shape=meta["shape"])
    tokenizer = c.dit.tokenizer or meta["tokenizer"]
    settings = dict(
        checkpoint=paths.resolve(s.checkpoint), step=step, num_samples=s.num_samples, labels=s.labels, seed=s.seed,
        part_size=s.part_size, num_classes=model.num_classes, latent_shape=list(generator.latent_shape),
        tokenizer=tokenizer if not paths.exists(tokenizer) else paths.resolve(tokenizer),
        latent_stats=paths.resolve(c.dit.latent_stats) if c.dit.latent_stats else paths.resolve(c.dit.latents),
        latent_multiplier=float(multiplier), **{k: sampler.get(k) for k in SAMPLER_FIELDS})
    return generator, params, settings


# ------------------------------------------------------------------------------------------------
# Labels and noise: functions of the sample index only.
# ------------------------------------------------------------------------------------------------
def class_labels(kind: str, n: int, num_classes: int, seed: int) -> np.ndarray:
    """(n,) int32: 'per_class' n / num_classes of each class in order, or 'uniform' random classes."""
    if kind == "per_class":
        if n % num_classes:
            raise runner.ConfigError(f"sample.num_samples={n} is not a multiple of the DiT's {num_classes} classes "
                                     "(sample.labels='per_class' draws num_samples / num_classes of each)")
        return np.repeat(np.arange(num_classes), n // num_classes).astype(np.int32)
    return np.random.default_rng(seed).integers(0, num_classes, n).astype(np.int32)


@functools.partial(jax.jit, static_argnums=(2,))
def _noise(key, indices, shape):
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))(indices)


def sample_noise(seed: int, indices, shape) -> np.ndarray:
    """(len(indices), *shape) float32: sample i's noise N(0, I) from fold_in(key(seed), i)."""
    return np.asarray(_noise(jax.random.key(seed), jnp.asarray(indices, jnp.uint32), tuple(shape)))


# [0, 1] -> uint8, truncated: floor(255 x), as the gFID evaluator quantises the samples it scores.
_quantize = jax.jit(lambda x: jnp.floor(255 * x.astype(jnp.float32)).astype(jnp.uint8))


# ------------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------------
def part_path(workdir: str, k: int) -> str:
    return paths.join(workdir, PARTS, f"part-{k:05d}.npz")


def _write_whole(path: str, data: bytes) -> None:
    """A file that appears only when complete: an object store writes objects whole; a local
    disk gets a temporary name renamed into place."""
    if paths.is_remote(path):
        paths.write_bytes(path, data)
    else:
        paths.write_bytes(path + ".tmp", data)
        paths.rename(path + ".tmp", path)


def _progress(workdir: str, settings: dict, n_parts: int) -> tuple[np.ndarray, bool]:
    """(which parts exist, whether samples.npz does), as process 0 (the writer) sees the workdir.
    W/parts/settings.json is written by the first run and compared by every rerun: parts made with
    other settings are a ConfigError on every process, not mixed in."""
    path = paths.join(workdir, PARTS, SETTINGS)
    settings = json.loads(json.dumps(settings))
    diff, done, complete = [], np.zeros(n_parts, bool), False
    if jax.process_index() == 0:
        if paths.isfile(path):
            old = paths.read_json(path)
            diff = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(old.keys() | settings.keys())
                    if old.get(k) != settings.get(k)]
        else:
            paths.write_json(path, settings, indent=1, sort_keys=True)
        done = np.array([paths.isfile(part_path(workdir, k)) for k in range(n_parts)])
        complete = paths.isfile(paths.join(workdir, SAMPLES))
    bad = len(diff)
    if jax.process_count() > 1:
        bad, done, complete = multihost_utils.broadcast_one_to_all((np.int32(bad), done, np.bool_(complete)))
    if bad:
        raise runner.ConfigError(f"{paths.join(workdir, PARTS)} holds samples made with other settings ("
                                 f"{'; '.join(diff) if diff else 'see the log of process 0'}): sample into another "
                                 "workdir, or delete that folder")
    return np.asarray(done, bool), bool(complete)


def sample(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict:
    """Samples config.sample part by part into `workdir` (see the module docstring); every process
    runs it (collectives), process 0 writes. Returns {num_samples, samples_per_second}."""
    s = config.sample
    n, bs, ps = s.num_samples, s.batch_size, s.part_size
    generator, params, settings = load(config, mesh)
    labels = class_labels(s.labels, n, generator.num_classes, s.seed)
    n_parts = -(-n // ps)
    done, complete = _progress(workdir, settings, n_parts)
    todo = [k for k in range(n_parts) if not done[k]]
    if not todo and complete:
        logging.warning("sample: nothing to do: %s is complete (all %d parts made)", paths.join(workdir, SAMPLES),
                        n_parts)
        return {"num_samples": float(n)}
    logging.info("sample: %d samples (%s labels, %d classes) of %s (step %s) in %d part(s) of %d, %d already in %s; "
                 "sampler %s", n, s.labels, generator.num_classes, s.checkpoint, settings["step"], n_parts, ps,
                 n_parts - len(todo), paths.join(workdir, PARTS),
                 ", ".join(f"{k}={settings[k]}" for k in SAMPLER_FIELDS))
    place = lambda a: jax.device_put(a, sharding.batch_sharding(mesh, a.ndim))  # noqa: E731
    t0, made, rate = time.perf_counter(), 0, float("nan")
    for j, k in enumerate(todo):
        pieces = []
        for start in range(k * ps, min((k + 1) * ps, n), bs):
            m = min(bs, n - start)  # the last batch is padded to the batch size, the padding dropped
            y = np.zeros(bs, np.int32)
            y[:m] = labels[start:start + m]
            noise = sample_noise(s.seed, np.arange(start, start + bs), generator.latent_shape)
            x = _quantize(generator.images(params, place(noise), place(y)))
            pieces.append(np.asarray(multihost_utils.process_allgather(x, tiled=True))[:m])
        part = np.concatenate(pieces)
        if jax.process_index() == 0:
            buf = io.BytesIO()
            np.savez(buf, images=part, labels=labels[k * ps:k * ps + len(part)])
            _write_whole(part_path(workdir, k), buf.getvalue())
        made += len(part)
        rate = made / (time.perf_counter() - t0)
        left = sum(min(ps, n - i * ps) for i in todo[j + 1:])
        logging.info("sample: part %d of %d written (samples %d-%d), %.2f samples/s, ETA %.0f s", k + 1, n_parts,
                     k * ps, k * ps + len(part) - 1, rate, left / rate)
    multihost_utils.sync_global_devices("sample parts written")
    if jax.process_index() == 0:
        write_samples(workdir, labels, ps, s.preview)
    multihost_utils.sync_global_devices("samples written")
    return {"num_samples": float(n), "samples_per_second": rate}


def _read_part(workdir: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    with files.NpzArchive(part_path(workdir, k)) as f:
        return f["images"], f["labels"]


def write_samples(workdir: str, labels: np.ndarray, part_size: int, preview: int) -> None:
    """W/samples.npz (arr_0: (N, H, W, 3) uint8, arr_1: the (N,) labels) streamed part by part
    (50k samples at 256 px are 9.8 GB: one part in memory, not the whole array twice) in the
    layout np.savez writes (an uncompressed zip of .npy files), then W/samples.png."""
    n, n_parts = len(labels), -(-len(labels) // part_size)
    rows = preview_rows(labels, preview)
    wanted, shown = {i for row in rows for i in row}, {}
    first, _ = _read_part(workdir, 0)
    header = np.lib.format.header_data_from_array_1_0(first)
    header["shape"] = (n, *first.shape[1:])
    path = paths.join(workdir, SAMPLES)
    target = path if paths.is_remote(path) else path + ".tmp"  # whole or absent
    with paths.open_file(target, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("arr_0.npy", "w", force_zip64=True) as out:
            np.lib.format.write_array_header_1_0(out, header)
            for k in range(n_parts):
                part, y = _read_part(workdir, k)
                lo, hi = k * part_size, min((k + 1) * part_size, n)
                if part.shape != (hi - lo, *first.shape[1:]) or part.dtype != np.uint8 or not np.array_equal(
                        y, labels[lo:hi]):
                    raise ValueError(f"{part_path(workdir, k)} holds images {part.shape} {part.dtype} and not the "
                                     f"labels of samples {lo}-{hi - 1}: delete it and rerun")
                out.write(np.ascontiguousarray(part).tobytes())
                shown.update((i, part[i - lo]) for i in wanted if lo <= i < hi)
        with z.open("arr_1.npy", "w", force_zip64=True) as out:
            np.lib.format.write_array(out, np.asarray(labels, np.int32))
    if target != path:
        paths.rename(target, path)
    logging.info("sample: wrote %s (arr_0: %s uint8, arr_1: labels)", path, header["shape"])
    if rows:
        grid = images.grid(np.stack([shown[i] for row in rows for i in row]), len(rows))
        png = io.BytesIO()
        Image.fromarray(grid).save(png, format="PNG")
        paths.write_bytes(paths.join(workdir, PREVIEW), png.getvalue())


def preview_rows(labels: np.ndarray, preview: int) -> list[list[int]]:
    """Sample indices of the preview grid: up to `preview` classes spread evenly over those
    present, one row each, of the first (up to `preview`) samples of each, as many in every row."""
    classes = np.unique(labels)
    if not len(classes) or preview <= 0:
        return []
    chosen = classes[np.unique(np.linspace(0, len(classes) - 1, min(preview, len(classes))).round().astype(int))]
    first = [np.flatnonzero(labels == c)[:preview] for c in chosen]
    cols = min(len(f) for f in first)
    return [[int(i) for i in f[:cols]] for f in first]
