"""Job `dit`: a class-conditional LightningDiT trained by rectified flow on cached tokenizer latents.

    python -m vtp_jax.main --config=configs/dit_demo.py --workdir=W

The job brings its state (params, the EMA pytree, AdamW), the flow step, the latent pipeline
(`vtp_jax.data.latents`; when `dit.latents` is empty it first extracts `latents` into W/latents)
and a hook that writes class-conditional sample grids (W/samples/<step>.png, TensorBoard). Its
evaluators (`type='generation'`: gFID / IS) score the EMA params through the same `Generator`.

The step (LightningDiT / VTP recipe): latents normalized per channel, one of the unflipped and
flipped latents drawn per sample, t ~ logit-normal(mu, sigma), x_t = t x1 + (1 - t) x0 with t = 0
noise, the velocity target x1 - x0, MSE + the channel-wise cosine term, labels dropped to the null
class with `class_dropout_prob` (CFG), AdamW, EMA every step.
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vtp_jax import config as config_lib
from vtp_jax import images, objectives, paths, sampling, sharding
from vtp_jax.checkpoints import tokenizers
from vtp_jax.data import latents as latents_lib
from vtp_jax.jobs import extract_latents
from vtp_jax.models import dit as dit_lib
from vtp_jax.models.vtp import VTP
from vtp_jax.train import optim, runner


@flax.struct.dataclass
class DiTState:
    step: jax.Array
    params: Any
    ema_params: Any  # EMA of params, its own pytree: what is sampled and evaluated
    opt_state: Any
    rng: jax.Array


def default_config() -> ml_collections.ConfigDict:
    """Model, flow recipe, latents (read, or extracted first) and sampling: VTP's XL/1 settings."""
    c = config_lib.base_config("dit")
    c.latents = config_lib.latents_config()  # what to extract when dit.latents is empty
    c.optim = config_lib.optim_config()
    c.dit = ml_collections.ConfigDict()
    c.dit.size = "XL"  # vtp_jax.models.dit.DIT_SIZES: tiny, B, L, XL (depth, width, heads)
    c.dit.patch_size = 1
    c.dit.mlp_ratio = 4.0
    c.dit.class_dropout_prob = 0.1  # CFG label dropout
    c.dit.qk_norm = False
    c.dit.use_rope = True
    c.dit.dtype = "float32"  # compute; 'bfloat16' as LightningDiT's autocast
    c.dit.remat = "none"
    c.dit.scan_layers = False  # the blocks as one nn.scan (LightningDiT.scan_layers): params stacked as blocks/...
    c.dit.batch_size = 1024  # global (LightningDiT: 1024)
    c.dit.ema_decay = 0.9999  # the EMA pytree, updated every step; sampled and evaluated
    c.dit.t_mu, c.dit.t_sigma = -0.75, 1.0  # logit-normal t (VTP-L; S / B: -0.5, 1.25)
    c.dit.latents = ""  # extract_latents' folder, or official *.safetensors shards; '' = extract `latents` first
    c.dit.latent_stats = ""  # '' = those of dit.latents; else a file / folder (the release's latents_stats.pt)
    c.dit.latent_multiplier = 1.0  # (z - mean) / std * multiplier
    c.dit.tokenizer = ""  # decodes samples; '' = the tokenizer the latents were extracted with
    c.dit.sample = ml_collections.ConfigDict()
    c.dit.sample.num_steps = 250  # grid points (LightningDiT: 250 = 249 Euler steps)
    c.dit.sample.shift = 0.075  # VTP's time shift (LightningDiT's own: 0.3; <= 0: none)
    c.dit.sample.method = "euler"  # 'euler' | 'heun' | 'dopri5'
    c.dit.sample.cfg_scale = 1.0  # VTP's headline numbers use no guidance
    c.dit.sample.cfg_interval_start = 0.0
    # None = guide all channels; 3 = the official forward_with_cfg (first 3 channels, the rest conditional)
    c.dit.sample.cfg_channels = ml_collections.FieldReference(None, field_type=int)
    c.dit.sample.every = 5_000  # steps between sample grids (W/samples/<step>.png and TensorBoard)
    c.dit.sample.classes = 8  # grid rows: this many classes ...
    c.dit.sample.per_class = 8  # ... times this many samples
    c.dit.sample.labels = ()  # the rows' class ids; () = `classes` of them spread over the label range
    return c


def validate(config: ml_collections.ConfigDict, n_batch_shards: int, n_processes: int = 1) -> list[str]:
    c, errs = config.dit, []
    if c.size not in dit_lib.DIT_SIZES:
        errs.append(f"dit.size={c.size!r}: expected one of {sorted(dit_lib.DIT_SIZES)}")
    if c.sample.method not in ("euler", "heun", "dopri5"):
        errs.append(f"dit.sample.method={c.sample.method!r}: expected 'euler', 'heun' or 'dopri5'")
    if c.sample.num_steps < 2:
        errs.append(f"dit.sample.num_steps={c.sample.num_steps}: grid points, at least 2")
    if c.batch_size % n_batch_shards or c.batch_size % n_processes:
        errs.append(f"dit.batch_size={c.batch_size} is not divisible by the {n_batch_shards} batch shards of the "
                    f"mesh and the {n_processes} processes")
    official = bool(c.latents) and latents_lib.is_official(c.latents)
    if not c.latents:
        if not config.latents.tokenizer:
            errs.append("dit.latents is empty and so is latents.tokenizer: give extracted latents "
                        "(--config.dit.latents=DIR) or a tokenizer to extract them with (--config.latents.tokenizer=DIR)")
        else:
            errs += extract_latents.validate(config, n_batch_shards, n_processes)
    elif not official and config_lib.checks_files(config) and not paths.isfile(paths.join(c.latents, "meta.json")):
        errs.append(f"dit.latents={c.latents}: neither a finished latent extraction (meta.json) nor official latent "
                    "shards (*.safetensors)")
    if official and not c.tokenizer:
        errs.append(f"dit.latents={c.latents} holds official latent shards, which do not name their tokenizer: "
                    "set dit.tokenizer (decodes the samples)")
    if config.train.accum_steps not in (0, 1):  # its step has no micro-batch loop: k would be ignored
        errs.append(f"train.accum_steps={config.train.accum_steps}: the DiT job does not accumulate gradients (1, or 0: auto)")
    if c.latent_stats and config_lib.checks_files(config) and not paths.exists(c.latent_stats):
        errs.append(f"dit.latent_stats={c.latent_stats} does not exist")
    if c.sample.cfg_channels is not None and c.sample.cfg_channels < 1:
        errs.append(f"dit.sample.cfg_channels={c.sample.cfg_channels}: None (all channels) or >= 1 (3: official)")
    return errs


def model_from(config: ml_collections.ConfigDict, meta: dict) -> dit_lib.LightningDiT:
    c = config.dit
    depth, width, heads = dit_lib.DIT_SIZES[c.size]
    h, _, channels = meta["shape"]  # the grid comes from the latents (16 x 16 at 256 px, 32 x 32 at 512 px)
    return dit_lib.LightningDiT(
        input_size=h, patch_size=c.patch_size, in_channels=channels, hidden_size=width, depth=depth,
        num_heads=heads, mlp_ratio=c.mlp_ratio, num_classes=meta["num_classes"],
        class_dropout_prob=c.class_dropout_prob, qk_norm=c.qk_norm, use_rope=c.use_rope, remat=c.remat,
        scan_layers=c.scan_layers,
        dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[c.dtype])


class Generator:
    """Class labels -> images in [0, 1]: the ODE sampler on the DiT (optionally guided), the
    inverse latent normalization, the tokenizer's pixel decoder. The sample hook and the gFID
    evaluator share it. `images(dit_params, noise, labels)` is jitted once per batch shape."""

    def __init__(self, model: dit_lib.LightningDiT, sample: ml_collections.ConfigDict, mean, std, multiplier: float,
                 tokenizer_model, tokenizer_params, latent_shape=None):
        self.model, self.num_classes, self.sample = model, model.num_classes, sample
        self.latent_shape = tuple(latent_shape or (model.input_size, model.input_size, model.in_channels))
        self.mean, self.std, self.multiplier = mean, std, multiplier  # the latent normalization
        self.tokenizer_model, self.tokenizer_params = tokenizer_model, tokenizer_params
        channels = model.in_channels

        def generate(dit_params, tok_params, noise, labels):
            v = lambda x, t, y: model.apply({"params": dit_params}, x, t, y)[..., :channels]  # noqa: E731
            field = lambda x, t: sampling.guided_velocity(  # noqa: E731
                v, x, t, labels, model.num_classes, sample.cfg_scale, sample.cfg_interval_start,
                sample.get("cfg_channels"))
            z = sampling.ode_sample(field, noise, sample.num_steps, sample.method, sample.shift)
            z = latents_lib.denormalize(z, mean, std, multiplier)
            pixels = tokenizer_model.apply({"params": tok_params}, z, method=VTP.decode)
            return jnp.clip(images.denormalize(pixels), 0.0, 1.0)

        self._images = jax.jit(generate)

    def images(self, dit_params, noise, labels):
        return self._images(dit_params, self.tokenizer_params, noise, labels)

    def with_sample(self, **overrides) -> "Generator":
        """The same generator with some dit.sample fields replaced (an evaluator's own guidance)."""
        sample = self.sample.copy_and_resolve_references()
        for k, v in overrides.items():
            sample[k] = v
        return Generator(self.model, sample, self.mean, self.std, self.multiplier, self.tokenizer_model,
                         self.tokenizer_params, self.latent_shape)


def load_generator_parts(config, meta, mesh):
    """(latent mean, std, tokenizer module, replicated tokenizer params) for decoding samples."""
    mean, std = latents_lib.latent_stats(config.dit.latents, config.dit.latent_stats, seed=config.seed)
    if mean.shape != (meta["shape"][-1],):
        raise runner.ConfigError(f"the latent statistics ({config.dit.latent_stats or config.dit.latents}) have "
                                 f"{mean.size} channels, the latents {meta['shape'][-1]}")
    field = "dit.tokenizer" if config.dit.tokenizer else f"the tokenizer of {config.dit.latents}/meta.json (or dit.tokenizer)"
    tok_cfg, tok_params = tokenizers.load_tokenizer(config.dit.tokenizer or meta["tokenizer"], field=field)
    replicated = sharding.replicated(mesh)
    decoder = {"pixel_decoder": tok_params["pixel_decoder"]}  # all that decoding reads
    return (jax.device_put(jnp.asarray(mean), replicated), jax.device_put(jnp.asarray(std), replicated), VTP(tok_cfg),
            jax.device_put(decoder, replicated))


def make_train_step(config, model: dit_lib.LightningDiT, tx):
    c = config.dit
    channels = model.in_channels

    def step(state: DiTState, batch: dict, consts):
        mean, std = consts
        rng = jax.random.fold_in(state.rng, state.step)
        r_flip, r_t, r_noise, r_drop = jax.random.split(rng, 4)
        b = batch["label"].shape[0]
        flip = jax.random.bernoulli(r_flip, 0.5, (b, 1, 1, 1))
        z = jnp.where(flip, batch["latent_flip"], batch["latent"])
        x1 = latents_lib.normalize(z, mean, std, c.latent_multiplier)
        t = objectives.sample_logit_normal_t(r_t, (b,), c.t_mu, c.t_sigma)
        x0 = jax.random.normal(r_noise, x1.shape, x1.dtype)

        def loss_fn(params):
            v = model.apply({"params": params}, objectives.interpolate(x0, x1, t), t, batch["label"], train=True,
                            rngs={"label_dropout": r_drop})
            return objectives.flow_loss(v[..., :channels], x0, x1).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ok = optim.finite(loss, opt_state)
        params = optim.keep_if(ok, params, state.params)
        ema = optim.keep_if(ok, optax.incremental_update(params, state.ema_params, 1.0 - c.ema_decay), state.ema_params)
        metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), lr=optim.current_lr(opt_state),
                       **optim.nonfinite_metrics(opt_state))
        return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics

    return step


def planned_meta(config: ml_collections.ConfigDict) -> dict:
    """What meta.json of the latents `config.latents` would extract will say (shape, classes), from
    the tokenizer's config.json and the data config: the compile plan's latents."""
    lat = config.latents
    tok = tokenizers.tokenizer_config(lat.tokenizer, field="latents.tokenizer")
    classes = extract_latents.num_classes(lat.data)
    if not classes:
        raise runner.ConfigError(f"latents.data (source {lat.data.source!r}) does not say how many classes its labels "
                                 "have: give extracted latents (--config.dit.latents=DIR) to compile the DiT for them")
    grid = lat.data.image_size // tok.patch_size
    return dict(shape=[grid, grid, tok.latent_dim], num_classes=classes)


def make_job(config: ml_collections.ConfigDict, mesh, workdir: str | None = None, abstract: bool = False) -> runner.Job:
    if abstract and not config.dit.latents:
        meta = planned_meta(config)
    else:
        if not config.dit.latents:  # extract `latents` into W/latents first (resumable; skipped when complete)
            if workdir is None:
                raise runner.ConfigError("dit.latents is empty: give extracted latents (or run the job with a "
                                         "workdir to extract them there)")
            folder = extract_latents.extract(config, paths.join(workdir, "latents"), mesh)
            config = config.copy_and_resolve_references()
            config.dit.latents = folder
        meta = latents_lib.read_meta(config.dit.latents)
    if not meta["num_classes"]:
        raise runner.ConfigError(f"{config.dit.latents}/meta.json does not say how many classes the labels have")
    model = model_from(config, meta)
    shapes = nn.meta.unbox(jax.eval_shape(lambda: _init_boxed(model, jax.random.key(0))))
    tx = optim.make_optimizer(config.optim, shapes, config.train.steps, depth=0)
    b, latent = config.dit.batch_size, tuple(meta["shape"])
    batch_spec = {"latent": jax.ShapeDtypeStruct((b, *latent), jnp.float32),
                  "latent_flip": jax.ShapeDtypeStruct((b, *latent), jnp.float32),
                  "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
    if abstract:  # the step's statistics as shapes; no generator (it samples and decodes, not compiled here)
        stats = jax.ShapeDtypeStruct((latent[-1],), jnp.float32, sharding=sharding.replicated(mesh))
        return runner.Job(config=config, init=lambda rng: init_state(model, tx, rng),
                          step=make_train_step(config, model, tx), consts=(stats, stats), model=model,
                          batch_spec=batch_spec)
    mean, std, tok_model, tok_params = load_generator_parts(config, meta, mesh)
    generator = Generator(model, config.dit.sample, mean, std, config.dit.latent_multiplier, tok_model, tok_params,
                          latent_shape=meta["shape"])

    def data():
        return latents_lib.make_train_iterator(config.dit.latents, batch_size=config.dit.batch_size,
                                               seed=config.seed, process_index=jax.process_index(),
                                               process_count=jax.process_count())

    s = config.dit.sample
    labels = np.repeat(grid_labels(s, model.num_classes), s.per_class).astype(np.int32)  # checked before training

    def write_samples(step, state, batch, writer, workdir):
        del batch
        noise = jax.random.normal(jax.random.key(config.seed), (len(labels), *generator.latent_shape))
        samples = np.asarray(jax.device_get(generator.images(state.ema_params, noise, jnp.asarray(labels))))
        picture = (images.grid(samples, len(labels) // s.per_class) * 255).astype(np.uint8)
        runner.write_images(writer, workdir, step, "samples", picture[None])

    return runner.Job(config=config, init=lambda rng: init_state(model, tx, rng), step=make_train_step(config, model, tx),
                      data=data,
                      consts=(mean, std), hooks=[runner.Hook(s.every, write_samples)], eval_target=generator,
                      eval_params=lambda state: state.ema_params, model=model, batch_spec=batch_spec)


def grid_labels(sample: ml_collections.ConfigDict, num_classes: int) -> np.ndarray:
    """The sample grid's row classes: `sample.labels`, else `sample.classes` ids a stride of
    num_classes // classes + 1 apart. The +1 matters for factorised labels (procedural: shape * 8 +
    colour): a stride of 8 would give eight shapes in one colour, 9 steps through both."""
    if sample.labels:
        bad = [k for k in sample.labels if not 0 <= k < num_classes]
        if bad:
            raise runner.ConfigError(f"dit.sample.labels {bad}: class ids must lie in [0, {num_classes}) (the "
                                     "latents' classes)")
        return np.asarray(sample.labels, np.int32)
    return (np.arange(sample.classes) * (num_classes // sample.classes + 1) % num_classes).astype(np.int32)


def init_state(model: dit_lib.LightningDiT, tx, rng) -> DiTState:
    """Boxed (logically annotated) state; the EMA starts as the params. The boxes go through
    `tx.init`, so AdamW's moments carry the axis names (and the shardings) of their parameter."""
    init_rng, rng = jax.random.split(rng)
    params = _init_boxed(model, init_rng)
    return DiTState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params),
                    rng=rng)


def _init_boxed(model: dit_lib.LightningDiT, rng):
    """Boxed params (logical axes kept for the runner's sharding) with LightningDiT's init."""
    init_rng, xavier_rng = jax.random.split(rng)
    x = jnp.zeros((1, model.input_size, model.input_size, model.in_channels), jnp.float32)
    params = model.init(init_rng, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
    return dit_lib.official_init(params, xavier_rng)
