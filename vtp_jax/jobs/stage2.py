"""Job `stage2`: the pixel decoder fine-tuned with a GAN, the rest of the tokenizer frozen.

    python -m vtp_jax.main --config=configs/demo_stage2.py --config.train.init_from=DIR --workdir=W

DIR is a release-format folder (a run's export/, a released VTP) or a stage-1 workdir. The encoder
and bottleneck (and every other part but the decoder) are constants of the step, never in an
optimizer state; latents are computed under stop_gradient. One jitted step updates both players:

  generator:     L1 + lpips_weight * LPIPS + lambda * disc_weight * L_G(D(decode(z))),
                 lambda = ||grad_W L_rec|| / (||grad_W L_G|| + 1e-4) clipped to max_adaptive_weight, W the
                 decoder's last layer (taming); both gradients from ONE forward pass and two VJPs;
  discriminator: hinge (or non-saturating) on real crops vs the reconstructions, + optional LeCam
                 (EMA-anchored logits) or R1 (gradient penalty on real images);

both only after disc_start. Each player has its own optax AdamW. Hooks write [input | before |
after] rows to W/reconstructions; the end writes W/export (same encoder, new decoder).
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from vtp_jax import config as config_lib
from vtp_jax import images, objectives, paths, sharding
from vtp_jax.checkpoints import tokenizers
from vtp_jax.data import pipeline
from vtp_jax.models.discriminator import PatchDiscriminator
from vtp_jax.models.vtp import VTP
from vtp_jax.train import optim, runner

LAST_LAYER = ("proj_out", "kernel")  # the pixel decoder's last layer: the adaptive weight's W


@flax.struct.dataclass
class Stage2State:
    step: jax.Array
    decoder: Any  # the pixel decoder's params, the only tokenizer part that trains
    disc: Any
    opt_state: Any
    disc_opt_state: Any
    lecam_ema: jax.Array  # (2,) EMA of the mean real / fake logits (LeCam's anchors)
    rng: jax.Array


def default_config() -> ml_collections.ConfigDict:
    """The data pipeline's reconstruction view, the decoder's optimizer and the GAN recipe (taming /
    LDM; the paper gives no settings). The tokenizer comes from train.init_from."""
    c = config_lib.base_config("stage2")
    c.data = config_lib.data_config()
    c.optim = config_lib.optim_config()
    s = c.stage2 = ml_collections.ConfigDict()
    # Generator: L1 + LPIPS (on [-1, 1] pixels) + adaptive weight x disc_weight x GAN term.
    s.l1_weight = 1.0
    s.lpips_weight = 1.0
    s.lpips_params = ""  # `python -m vtp_jax.checkpoints.torch_convert lpips` output
    s.gan_loss = "hinge"  # 'hinge' | 'non_saturating'
    s.disc_weight = 0.5
    s.disc_start = 0  # steps before the GAN term (and the discriminator's updates) start
    s.max_adaptive_weight = 1e4  # cap of ||grad_last(nll)|| / ||grad_last(g)||
    # Discriminator: PatchGAN (ndf 64, 3 layers; GroupNorm instead of taming's BatchNorm).
    s.disc_ndf = 64
    s.disc_layers = 3
    s.disc_norm = "group"
    s.disc_lr = 1e-4
    s.disc_b1, s.disc_b2 = 0.5, 0.9  # taming
    s.regularizer = "none"  # 'none' | 'lecam' (Tseng et al. 2021) | 'r1' (Mescheder et al. 2018)
    s.lecam_weight = 0.001
    s.lecam_ema = 0.99
    s.r1_gamma = 1.0
    return c


def validate(config: ml_collections.ConfigDict, n_batch_shards: int, n_processes: int = 1) -> list[str]:
    s, d, errs = config.stage2, config.data, []
    if not config.train.init_from:
        errs.append("train.init_from is empty: stage 2 starts from a tokenizer (a release-format folder such as a "
                    "run's export/, or a stage-1 workdir)")
    if s.gan_loss not in ("hinge", "non_saturating"):
        errs.append(f"stage2.gan_loss={s.gan_loss!r}: expected 'hinge' or 'non_saturating'")
    if s.regularizer not in ("none", "lecam", "r1"):
        errs.append(f"stage2.regularizer={s.regularizer!r}: expected 'none', 'lecam' or 'r1'")
    if d.batch_rec <= 0 or d.batch_rec % n_batch_shards or d.batch_rec % n_processes:
        errs.append(f"data.batch_rec={d.batch_rec} must be a positive multiple of the {n_batch_shards} batch shards "
                    f"and the {n_processes} processes")
    if d.batch_clip < d.batch_rec:
        errs.append(f"data.batch_clip={d.batch_clip} < data.batch_rec={d.batch_rec}: records are read batch_clip at a time")
    if config.train.accum_steps not in (0, 1):  # its step has no micro-batch loop: k would be ignored
        errs.append(f"train.accum_steps={config.train.accum_steps}: stage 2 does not accumulate gradients (1, or 0: auto)")
    if s.lpips_weight and config_lib.checks_files(config) and not paths.exists(s.lpips_params):
        errs.append(f"stage2.lpips_weight={s.lpips_weight} but stage2.lpips_params={s.lpips_params!r} does not exist "
                    "(docs/training.md: LPIPS weights) or set stage2.lpips_weight=0")
    return errs


def split_tokenizer(params):
    """(frozen parts, pixel decoder)."""
    frozen = {k: v for k, v in params.items() if k != "pixel_decoder"}
    return frozen, params["pixel_decoder"]


def make_train_step(config, model: VTP, disc: PatchDiscriminator, tx, disc_tx):
    s = config.stage2
    g_loss = objectives.hinge_g_loss if s.gan_loss == "hinge" else objectives.non_saturating_g_loss
    d_loss = objectives.hinge_d_loss if s.gan_loss == "hinge" else objectives.non_saturating_d_loss

    def decode(decoder, latents):
        return model.apply({"params": {"pixel_decoder": decoder}}, latents, method=VTP.decode)

    def step(state: Stage2State, batch: dict, consts):
        frozen, lpips_params = consts
        x = batch["rec_images"]
        latents = jax.lax.stop_gradient(model.apply({"params": frozen}, x, method=VTP.encode))
        gan_on = (state.step >= s.disc_start).astype(jnp.float32)
        x_px = images.to_lpips_range(x)

        def generator_terms(decoder):
            recon = decode(decoder, latents)
            r_px = images.to_lpips_range(recon)
            l1 = objectives.l1_loss(r_px, x_px).mean()
            nll = s.l1_weight * l1
            lp = jnp.zeros(())
            if s.lpips_weight:
                lp = objectives.lpips(lpips_params, r_px, x_px).mean()
                nll = nll + s.lpips_weight * lp
            gen = g_loss(disc.apply({"params": state.disc}, r_px))
            return (nll, gen), (recon, l1, lp)

        # One forward, two VJPs: the gradients of L_rec and of L_G, needed apart for the adaptive weight.
        (nll, gen), vjp, (recon, l1, lp) = jax.vjp(generator_terms, state.decoder, has_aux=True)
        (g_nll,) = vjp((jnp.ones(()), jnp.zeros(())))
        (g_gen,) = vjp((jnp.zeros(()), jnp.ones(())))
        last = lambda g: g[LAST_LAYER[0]][LAST_LAYER[1]]  # noqa: E731
        weight = objectives.adaptive_generator_weight(last(g_nll), last(g_gen), s.max_adaptive_weight)
        scale = weight * s.disc_weight * gan_on
        grads = jax.tree.map(lambda a, b: a + scale * b, g_nll, g_gen)
        updates, opt_state = tx.update(grads, state.opt_state, state.decoder)
        decoder = optax.apply_updates(state.decoder, updates)

        fake_px = jax.lax.stop_gradient(images.to_lpips_range(recon))

        def disc_terms(disc_params):
            real = disc.apply({"params": disc_params}, x_px)
            fake = disc.apply({"params": disc_params}, fake_px)
            loss = d_loss(real, fake)
            reg = jnp.zeros(())
            if s.regularizer == "lecam":  # pulls the logits toward the other side's running mean
                reg = s.lecam_weight * (jnp.mean(jax.nn.relu(real - state.lecam_ema[1]) ** 2)
                                        + jnp.mean(jax.nn.relu(state.lecam_ema[0] - fake) ** 2))
            elif s.regularizer == "r1":
                grad_x = jax.grad(lambda im: jnp.sum(disc.apply({"params": disc_params}, im)))(x_px)
                reg = 0.5 * s.r1_gamma * jnp.mean(jnp.sum(grad_x ** 2, axis=(1, 2, 3)))
            return loss + reg, (loss, reg, real.mean(), fake.mean())

        (_, (ld, reg, real_mean, fake_mean)), d_grads = jax.value_and_grad(disc_terms, has_aux=True)(state.disc)
        d_grads = jax.tree.map(lambda g: g * gan_on, d_grads)  # the discriminator waits for disc_start too
        d_updates, disc_opt_state = disc_tx.update(d_grads, state.disc_opt_state, state.disc)
        disc_params = optax.apply_updates(state.disc, d_updates)
        lecam_ema = s.lecam_ema * state.lecam_ema + (1 - s.lecam_ema) * jnp.stack([real_mean, fake_mean])

        total = nll + scale * gen
        ok = optim.finite(total + ld, opt_state, disc_opt_state)
        new_state = state.replace(step=state.step + 1, decoder=optim.keep_if(ok, decoder, state.decoder),
                                  disc=optim.keep_if(ok, disc_params, state.disc), opt_state=opt_state,
                                  disc_opt_state=disc_opt_state, lecam_ema=optim.keep_if(ok, lecam_ema, state.lecam_ema))
        metrics = dict(loss=total, l_rec=nll, l_l1=l1, l_lpips=lp, g_loss=gen, adaptive_weight=weight,
                       d_loss=ld, d_reg=reg, logits_real=real_mean, logits_fake=fake_mean, gan_on=gan_on,
                       grad_norm=optax.tree.norm(grads), d_grad_norm=optax.tree.norm(d_grads),
                       lr=optim.current_lr(opt_state), **optim.nonfinite_metrics(opt_state, disc_opt_state))
        return new_state, metrics

    return step


def make_job(config: ml_collections.ConfigDict, mesh, workdir: str | None = None, abstract: bool = False) -> runner.Job:
    s = config.stage2
    size = config.data.image_size
    replicated = sharding.replicated(mesh)
    if abstract:  # the architecture from config.json, the weights as shapes
        model_cfg = tokenizers.tokenizer_config(config.train.init_from, field="train.init_from")
        params = jax.eval_shape(lambda: nn.meta.unbox(VTP(model_cfg).init(jax.random.key(0),
                                                                           jnp.zeros((1, size, size, 3)))["params"]))
    else:
        model_cfg, params = tokenizers.load_tokenizer(config.train.init_from, field="train.init_from")
    if not model_cfg.decoder.depth:
        raise runner.ConfigError(f"train.init_from={config.train.init_from}: the tokenizer has no pixel decoder")
    model = VTP(model_cfg)
    frozen, decoder0 = split_tokenizer(params)
    if abstract:
        frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), frozen)
    else:
        frozen = jax.device_put(frozen, replicated)
    lpips_params = None
    if s.lpips_weight:
        lpips_params = (objectives.abstract_lpips_params(replicated) if abstract
                        else jax.device_put(objectives.load_lpips_params(s.lpips_params), replicated))
    disc = PatchDiscriminator(s.disc_ndf, s.disc_layers, s.disc_norm)
    tx = optim.make_optimizer(config.optim, decoder0, config.train.steps, depth=0)
    disc_tx = optax.apply_if_finite(optax.adamw(s.disc_lr, s.disc_b1, s.disc_b2, weight_decay=0.0),
                                    max_consecutive_errors=2 ** 31 - 1)

    def init(rng):
        init_rng, rng = jax.random.split(rng)
        boxed = model.init(init_rng, jnp.zeros((1, size, size, 3)))["params"]
        decoder = boxed["pixel_decoder"]  # boxed: logical axes shard it; `start` loads the values
        disc_params = disc.init(init_rng, jnp.zeros((1, size, size, 3)))["params"]
        return Stage2State(step=jnp.zeros((), jnp.int32), decoder=decoder, disc=disc_params,
                           opt_state=tx.init(decoder), disc_opt_state=disc_tx.init(disc_params),
                           lecam_ema=jnp.zeros((2,)), rng=rng)

    def start(state):
        placed = jax.tree.map(lambda old, new: jax.device_put(jnp.asarray(new, old.dtype), old.sharding),
                              state.decoder, decoder0)
        logging.info("stage 2 from %s: encoder frozen, pixel decoder trained", config.train.init_from)
        return state.replace(decoder=placed)

    def data():
        return pipeline.make_train_iterator(config.data, seed=config.seed, process_index=jax.process_index(),
                                            process_count=jax.process_count(), views=["rec"])

    reconstruct = jax.jit(lambda dec, x: model.apply(
        {"params": {**frozen, "pixel_decoder": dec}}, model.apply({"params": frozen}, x, method=VTP.encode),
        method=VTP.decode))
    before = {}

    def write_reconstructions(step, state, batch, writer, workdir):
        x = batch["rec_images"] if "x" not in before else before["x"]
        if "x" not in before:  # the first batch seen, reconstructed by the initial decoder
            before.update(x=x, recon=reconstruct(jax.device_put(decoder0, replicated), x))
        runner.write_image_rows(writer, workdir, step, "reconstructions", x, before["recon"],
                                reconstruct(state.decoder, x))

    def export(state, folder):
        tokenizers.export_tokenizer(model_cfg, {**jax.device_get(frozen), "pixel_decoder": state.decoder}, folder, size)

    return runner.Job(config=config, init=init, step=make_train_step(config, model, disc, tx, disc_tx), data=data,
                      consts=(frozen, lpips_params), start=start,
                      hooks=[runner.Hook(config.train.images_every, write_reconstructions)], eval_target=model,
                      eval_params=lambda state: {**frozen, "pixel_decoder": state.decoder}, export=export,
                      model=model, batch_spec={"rec_images": jax.ShapeDtypeStruct((config.data.batch_rec, size, size, 3),
                                                                                  jnp.float32)})
