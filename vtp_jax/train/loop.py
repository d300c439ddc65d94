"""The training loop shared by every job: validation, mesh, sharded state, orbax checkpoints
(with the grain iterator state), preemption, the non-finite guard, clu metrics and MFU."""
from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions

from vtp_jax import config as config_lib
from vtp_jax.data import pipeline
from vtp_jax.models.vtp import VTP
from vtp_jax.train import optim, pretrain, sharding

# Dense bf16 peak FLOP/s per device (vendor figures), by jax device_kind substring.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


class ConfigError(ValueError):
    """An impossible config, reported before anything compiles."""


def validate(config: ml_collections.ConfigDict, n_batch_shards: int, n_processes: int = 1):
    """Every problem in one message, each on its own line."""
    try:
        config_lib.check_fields(config, config_lib.default_config())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    d, o, m = config.data, config.objectives, config.model
    errs = []
    on = pretrain.active(config)
    if not any(on.values()):
        errs.append("all objective weights (objectives.l_rec / l_ssl / l_clip) are 0: nothing to train")
    for name in ("batch_clip", "batch_ssl", "batch_rec"):
        b = d[name]
        if b % n_batch_shards or b % n_processes:
            errs.append(f"data.{name}={b} is not divisible by the {n_batch_shards} batch shards of the mesh "
                        f"(data x fsdp) and the {n_processes} processes")
    for name in ("batch_ssl", "batch_rec"):
        if d[name] > d.batch_clip:
            errs.append(f"data.{name}={d[name]} > data.batch_clip={d.batch_clip}: sub-batches are drawn from the CLIP batch")
    for name in ("image_size", "global_crops_size", "local_crops_size"):
        if d[name] % m.patch_size:
            errs.append(f"data.{name}={d[name]} is not a multiple of model.patch_size={m.patch_size}")
    if on["clip"] and not m.text.depth:
        errs.append("objectives.l_clip > 0 needs a text tower (model.text.depth > 0)")
    if on["clip"] and d.context_length != m.text.context_length:
        errs.append(f"data.context_length={d.context_length} != model.text.context_length={m.text.context_length}")
    if on["ssl"] and not m.head.prototypes:
        errs.append("objectives.l_ssl > 0 needs a DINO head (model.head.prototypes > 0)")
    if on["rec"] and not m.decoder.depth:
        errs.append("objectives.l_rec > 0 needs a pixel decoder (model.decoder.depth > 0)")
    if o.centering not in ("centering", "sinkhorn_knopp"):
        errs.append(f"objectives.centering={o.centering!r}: expected 'centering' or 'sinkhorn_knopp'")
    if on["rec"] and o.lpips_weight and not os.path.exists(o.lpips_params):
        errs.append(f"objectives.lpips_weight={o.lpips_weight} but objectives.lpips_params={o.lpips_params!r} does "
                    "not exist: convert the VGG16 + LPIPS weights with `python -m vtp_jax.checkpoints.torch_convert "
                    "lpips` (see README) or set objectives.lpips_weight=0")
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))


def measure_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
    """float32 matmul FLOP/s of this host, the CPU 'peak' that MFU is measured against."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def peak_flops(devices) -> float:
    """Machine peak FLOP/s over `devices` (CPU: one measured host matmul peak)."""
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        return measure_cpu_peak()
    per = next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)
    if per is None:
        logging.warning("no peak FLOP/s known for %r: MFU not reported", kind)
        return float("nan")
    return per * len(devices)


def compiled_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def state_shardings(abstract_boxed_state, mesh):
    """Params by their logical names; teacher params like their student twins; optimizer leaves
    shaped like a parameter like that parameter; everything else replicated."""
    param_sh = sharding.logical_shardings(abstract_boxed_state.params, mesh)
    by_path = {}
    jax.tree_util.tree_map_with_path(lambda p, s: by_path.__setitem__(tuple(map(str, p)), s), param_sh)
    shapes = {tuple(map(str, p)): x.shape for p, x in
              jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_boxed_state.params))[0]}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def like_param(path, x):
        path = tuple(map(str, path))
        for i in range(len(path)):
            if path[i:] in by_path and shapes[path[i:]] == x.shape:
                return by_path[path[i:]]
        return replicated

    return jax.tree_util.tree_map_with_path(like_param, nn.meta.unbox(abstract_boxed_state))


class Preemption:
    """SIGTERM (TPU maintenance, SLURM time limit) -> save at the next step boundary, exit 0."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, *_):
        self.requested = True

    def reached(self, step: int, manager: ocp.CheckpointManager) -> bool:
        # Multi-host: orbax agrees on a common step through JAX's preemption sync manager.
        return self.requested or (jax.process_count() > 1 and manager.reached_preemption(step))


def _save(manager, step, state, data_iter):
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=pipeline.checkpoint_save_args(data_iter)))


class Trainer(NamedTuple):
    """What the loop, the benchmarks and the tests need to drive the sharded step."""
    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    model: VTP
    shardings: Any  # of the TrainState
    init: Callable  # rng -> sharded TrainState
    step: Callable  # jitted (state, global batch, lpips_params) -> (state, metrics), donates the state
    lpips_params: Any  # replicated LPIPS weights, or None when LPIPS is off


def build(config: ml_collections.ConfigDict, mesh=None) -> Trainer:
    """Validates the config, then builds the mesh, the sharded state layout and the jitted step.
    Call `init` / `step` inside `with scope(trainer)`."""
    mesh = mesh or sharding.make_mesh(config.train.mesh)
    validate(config, sharding.batch_size_of(mesh), jax.process_count())
    config = config.copy_and_resolve_references()
    model_cfg = pretrain.model_config_for(config)
    model = VTP(model_cfg)
    size = config.data.image_size
    abstract_params = nn.meta.unbox(jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]))
    tx = optim.make_optimizer(config.optim, abstract_params, config.train.steps, model_cfg.depth)
    abstract = jax.eval_shape(lambda: pretrain.init_state(config, model, tx, jax.random.key(0)))
    shardings = state_shardings(abstract, mesh)
    lpips_params = None
    if pretrain.active(config)["rec"] and config.objectives.lpips_weight:
        from vtp_jax.objectives import load_lpips_params
        lpips_params = jax.device_put(load_lpips_params(config.objectives.lpips_params),
                                      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    step_fn = pretrain.make_train_step(config, model, tx)
    init = jax.jit(lambda r: nn.meta.unbox(pretrain.init_state(config, model, tx, r)), out_shardings=shardings)
    jitted = jax.jit(step_fn, in_shardings=(shardings, None, None), out_shardings=(shardings, None), donate_argnums=0)
    return Trainer(config, mesh, model, shardings, init, jitted, lpips_params)


@contextlib.contextmanager
def scope(trainer: Trainer):
    """The mesh (for shard_map'd losses) and the logical-axis rules (for activation constraints)."""
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        yield


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pre-trains until config.train.steps; returns the last logged metrics (host floats)."""
    tr = build(config)
    config, mesh, model, shardings = tr.config, tr.mesh, tr.model, tr.shardings
    t = config.train
    rng = jax.random.key(config.seed)
    with scope(tr):
        views = [k for k, on in pretrain.active(config).items() if on]  # only what the step consumes
        data_iter = pipeline.make_train_iterator(config.data, seed=config.seed, process_index=jax.process_index(),
                                                 process_count=jax.process_count(), views=views)
        manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=t.keep_checkpoints, enable_async_checkpointing=True,
                                                 create=True))
        abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      jax.eval_shape(tr.init, rng), shardings)
        latest = manager.latest_step()
        if latest is not None:
            restored = manager.restore(latest, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=pipeline.checkpoint_restore_args(data_iter)))
            state = restored["state"]
            logging.info("restored step %d from %s", latest, manager.directory)
        else:
            state = tr.init(rng)
            if t.init_from:
                state = _init_from_release(state, t.init_from)

        writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
        if latest is None:
            writer.write_hparams({k: str(v) for k, v in config.to_dict().items()})
            parameter_overview.log_parameter_overview(state.params)
        start = int(state.step)
        preempt = Preemption()
        hooks = [periodic_actions.ReportProgress(num_train_steps=t.steps, writer=writer)]
        if t.profile_steps and jax.process_index() == 0:
            hooks.append(periodic_actions.Profile(num_profile_steps=t.profile_steps, logdir=workdir,
                                                  first_profile=start + 3))

        reconstruct = jax.jit(lambda p, x: model.apply({"params": p}, model.apply({"params": p}, x, method=VTP.encode),
                                                       method=VTP.decode))  # compiled once, used every images_every
        metrics, compiled, flops, peak, last_t = {}, None, float("nan"), float("nan"), None
        for step in range(start, t.steps):
            batch = sharding.global_batch(next(data_iter), mesh)
            if compiled is None:
                compiled = tr.step.lower(state, batch, tr.lpips_params).compile()
                flops = compiled_flops(compiled) * len(jax.devices())
                peak = peak_flops(jax.devices())
                logging.info("train step: %.3g FLOPs per step (XLA cost analysis), peak %.3g FLOP/s", flops, peak)
                last_t = time.perf_counter()
            state, metrics = compiled(state, batch, tr.lpips_params)
            for h in hooks:
                h(step + 1)
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                metrics = jax.device_get(metrics)
                now = time.perf_counter()
                step_time = (now - last_t) / (done - max(start, done - t.log_every))
                last_t = now
                metrics = {k: float(v) for k, v in metrics.items()}
                metrics["mfu"] = flops / step_time / peak
                metrics.update({f"data/{k}": v for k, v in pipeline.skip_counts(data_iter).items()})
                writer.write_scalars(done, metrics)
                if metrics["nonfinite_in_a_row"] >= t.max_nonfinite:
                    raise FloatingPointError(
                        f"{int(metrics['nonfinite_in_a_row'])} non-finite steps in a row at step {done} (limit "
                        f"train.max_nonfinite={t.max_nonfinite}); last finite checkpoint: {manager.latest_step()}")
            if t.images_every and (done % t.images_every == 0 or done == t.steps) and pretrain.active(config)["rec"]:
                _write_reconstructions(writer, workdir, done, reconstruct, state.params, batch)
            if preempt.reached(done, manager):
                _save(manager, done, state, data_iter)
                manager.wait_until_finished()
                logging.warning("preempted: checkpoint at step %d saved, exiting", done)
                writer.flush()
                raise SystemExit(0)
            if done % t.checkpoint_every == 0 or done == t.steps:
                _save(manager, done, state, data_iter)
        manager.wait_until_finished()
        _export(config, model.config, state.params, os.path.join(workdir, "export"))
        writer.flush()
    return metrics


def _export(config, model_cfg, params, folder):
    """The final student in the release format: `vtp_jax.load_pretrained(workdir/export)`."""
    from jax.experimental import multihost_utils

    from vtp_jax.checkpoints import released

    params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        try:
            released.export_release(model_cfg, params, folder, config.data.image_size)
            logging.info("exported the model to %s (vtp_jax.load_pretrained opens it)", folder)
        except released.CheckpointError as e:
            logging.warning("no release-format export: %s", e)


def _init_from_release(state, folder):
    """Overwrites the student and teacher with a released VTP's weights where they exist."""
    from vtp_jax.checkpoints import released

    _, rel = released.load_release(folder)

    def merge(ours, theirs, path=""):
        if isinstance(ours, dict):
            return {k: merge(v, theirs.get(k) if isinstance(theirs, dict) else None, f"{path}/{k}") for k, v in ours.items()}
        if theirs is None:
            return ours
        if theirs.shape != ours.shape:
            raise ValueError(f"init_from {folder}: {path} has shape {theirs.shape}, the config wants {ours.shape}")
        return jax.device_put(jnp.asarray(theirs, ours.dtype), ours.sharding)

    params = merge(state.params, rel)
    logging.info("initialised from released checkpoint %s", folder)
    return state.replace(params=params, teacher_params=pretrain.teacher_of(params))


def _write_reconstructions(writer, workdir, step, reconstruct, params, batch):
    from vtp_jax.reconstruct import denormalize

    from jax.experimental import multihost_utils

    # The global rec batch (sharded over hosts) and its reconstruction, gathered to every host.
    x, recon = multihost_utils.process_allgather((batch["rec_images"], reconstruct(params, batch["rec_images"])),
                                                 tiled=True)
    x, recon = x[:8], recon[:8]
    pairs = np.stack([np.concatenate([denormalize(a), denormalize(b)], 1) for a, b in zip(x, recon)])
    writer.write_images(step, {"reconstructions": pairs})
    if jax.process_index() == 0:
        from PIL import Image

        os.makedirs(os.path.join(workdir, "reconstructions"), exist_ok=True)
        Image.fromarray(np.concatenate(list(pairs), 0)).save(os.path.join(workdir, "reconstructions", f"{step:07d}.png"))
