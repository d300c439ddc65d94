"""THE training loop, shared by every job.

A job (a module of `vtp_jax.jobs`, found there by `config.job`) has `default_config()`,
`validate(config, n_batch_shards, n_processes) -> [errors]` and `make_job(config, mesh, workdir) ->
Job`: it brings its state, its step, its data and its hooks. The runner owns everything else: the
config check, the mesh, the sharded state layout (from the logical axis names of the job's state),
jit with donation, orbax checkpoints together with the data iterator's state, preemption, the
non-finite guard, metric writing, MFU, the evaluators named in `config.evals`, and the export.

    python -m vtp_jax.main --config=configs/X.py --workdir=W      # config.job picks the job
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import signal
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from jax.experimental import multihost_utils
from jax.extend import core as jax_core
from PIL import Image

from vtp_jax import config as config_lib
from vtp_jax import images, paths, sharding
from vtp_jax.evals import evaluator
from vtp_jax.train import checkpointing

# Dense bf16 peak FLOP/s per device (vendor figures), by jax device_kind substring (first match).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}
# HBM per device (vendor figures), by the same substrings: the memory limit when a device does not
# report one (compile-only TPU devices).
HBM_BYTES = {"TPU v4": 32 << 30, "TPU v5 lite": 16 << 30, "TPU v5e": 16 << 30, "TPU v5p": 95 << 30,
             "TPU v5": 95 << 30, "TPU v6": 32 << 30, "H100": 80 << 30, "H200": 141 << 30, "A100": 80 << 30,
             "B200": 192 << 30}


def by_kind(table: dict, device_kind: str):
    """The entry of a PEAK_FLOPS / HBM_BYTES table for a jax device_kind, or None."""
    return next((v for k, v in table.items() if k.lower() in device_kind.lower()), None)


ConfigError = config_lib.ConfigError


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(step, state, batch, writer, workdir)` every `every` steps and after the last step
    (reconstructions, samples)."""
    every: int
    fn: Callable[[int, Any, dict], None]


@dataclasses.dataclass(frozen=True)
class Job:
    """What a job brings to the runner.

    init: rng -> state whose parameters are boxed with logical axis names (nn.Partitioned), kept
      through `tx.init` so that optimizer moments and EMA copies carry them too; the runner
      derives every leaf's sharding from the names (unnamed leaves are replicated).
    step: (state, global batch, consts) -> (state, metrics), pure; None for a job that only
      evaluates. Metrics may hold `nonfinite_in_a_row` (the runner aborts past train.max_nonfinite).
    data: () -> this process's iterator of NumPy batches (a grain iterator: checkpointed with the
      state); None without a step.
    consts: arrays the step reads but never updates (LPIPS weights, a frozen tokenizer), placed.
    start: state -> state after a fresh init (init_from); not called on a restore.
    eval_target / eval_params: what `config.evals` evaluators are built on, and the state -> params
      they score. export: (state, folder) at the end (process 0 writes).
    batch_spec / accum_choices: the shapes the step is compiled for and the micro-batch counts it
      accepts, what the compile plan (train/aot.py) lowers and searches.

    `make_job(config, mesh, workdir, abstract=True)` builds the same job from shapes alone: no file
    is read (weights, latents), nothing is allocated; consts are ShapeDtypeStructs with shardings.
    """
    config: ml_collections.ConfigDict
    init: Callable[[jax.Array], Any]
    step: Callable | None = None
    data: Callable[[], Iterator[dict]] | None = None
    consts: Any = None
    start: Callable[[Any], Any] | None = None
    hooks: Sequence[Hook] = ()
    eval_target: Any = None
    eval_params: Callable[[Any], Any] = lambda state: state.params
    export: Callable[[Any, str], None] | None = None
    model: Any = None  # the Flax module the job trains (for hooks, benchmarks and tests)
    run: Callable[[], dict] | None = None
    batch_spec: dict | None = None  # the step's global batch, {name: ShapeDtypeStruct} (the compile plan)
    accum_choices: Sequence[int] = (1,)  # train.accum_steps values the step can take on this mesh


@dataclasses.dataclass(frozen=True)
class Trainer:
    """A job with its mesh, state layout and compiled functions (drive it inside `scope`)."""
    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    job: Job
    shardings: Any  # of the state
    init: Callable  # rng -> sharded state
    step: Callable | None  # jitted (state, global batch, consts) -> (state, metrics), donates the state

    @property
    def model(self):
        return self.job.model

    @property
    def consts(self):
        return self.job.consts


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    """The run's mesh (train.mesh, train.dcn_mesh) on this machine's devices (or `devices`, e.g. a
    TPU topology's compile-only ones); one that does not fit them is a ConfigError naming the
    fields and the meshes that would fit."""
    t = config.train
    devices = list(jax.devices() if devices is None else devices)
    dcn = tuple(t.get("dcn_mesh", (1, 1, 1)))
    try:
        return sharding.make_mesh(t.mesh, devices, dcn=dcn)
    except ValueError as e:
        hosts = len({d.process_index for d in devices})
        fits = ", ".join(str(m) for m in sharding.meshes_that_fit(devices, dcn))
        raise ConfigError(f"train.mesh={tuple(t.mesh)}, train.dcn_mesh={dcn} on {len(devices)} devices in {hosts} "
                          f"process(es): {e}. Meshes that fit (data, fsdp, tensor): {fits or 'none'}") from None


def validate(job_module, config: ml_collections.ConfigDict, n_batch_shards: int, n_processes: int = 1):
    """Every problem of the config in one message, each on its own line (before any compile)."""
    try:
        config_lib.check_fields(config, job_module.default_config())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    errs = job_module.validate(config, n_batch_shards, n_processes) + evaluator.validate(config)
    errs += config_lib.value_errors(config)
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))


@functools.cache
def measure_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
    """float32 matmul FLOP/s of this host, the CPU 'peak' that MFU is measured against (once per
    process: a study's nested runs share the host)."""
    a = jax.numpy.ones((n, n), jax.numpy.float32)
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
    per = by_kind(PEAK_FLOPS, kind)
    if per is None:
        logging.warning("no peak FLOP/s known for %r: MFU not reported", kind)
        return float("nan")
    return per * len(devices)


def model_flops(fn, *args) -> float:
    """Matmul and convolution FLOPs of fn(*args) over all devices, counted on its jaxpr (remat
    recomputation included). XLA's cost analysis counts a loop body once, so under
    `scan_layers` it misses all but one block; here a scan body counts `length` times."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name, p = eqn.primitive.name, eqn.params
        if name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            (_, rc), (_, rb) = p["dimension_numbers"]
            total += 2.0 * np.prod(lhs) * np.prod([d for i, d in enumerate(rhs) if i not in rc and i not in rb])
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[p["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(rhs) / out_features
        elif name == "cond":
            total += max(_jaxpr_flops(b.jaxpr) for b in p["branches"])
        else:
            times = p["length"] if name == "scan" else p["mesh"].size if name == "shard_map" else 1
            for v in p.values():
                for sub in v if isinstance(v, (tuple, list)) else (v,):
                    if isinstance(sub, (jax_core.Jaxpr, jax_core.ClosedJaxpr)):
                        total += times * _jaxpr_flops(getattr(sub, "jaxpr", sub))
    return total


def build(job_module, config: ml_collections.ConfigDict, mesh=None, workdir: str | None = None,
          abstract: bool = False) -> Trainer:
    """Validates the config, then builds the job, the mesh, the sharded state layout (every leaf
    from its logical axis names) and the jitted step. Call `init` / `step` inside `with scope(trainer)`.
    `abstract`: the job from shapes alone (Job's docstring), for lowering without running."""
    mesh = mesh or make_mesh(config)
    validate(job_module, config, sharding.batch_size_of(mesh), jax.process_count())
    job = job_module.make_job(config.copy_and_resolve_references(), mesh, workdir, abstract=abstract)
    config = job.config
    if job.run is not None or job.init is None:  # a job that runs itself, or nothing to compile
        return Trainer(config, mesh, job, None, None, None)
    shardings = sharding.logical_shardings(jax.eval_shape(job.init, jax.random.key(0)), mesh)
    init = jax.jit(lambda r: nn.meta.unbox(job.init(r)), out_shardings=shardings)
    step = None
    if job.step is not None:
        step = jax.jit(job.step, in_shardings=(shardings, None, None), out_shardings=(shardings, None),
                       donate_argnums=0)
    return Trainer(config, mesh, job, shardings, init, step)


@contextlib.contextmanager
def scope_of(mesh):
    """The mesh (for shard_map'd losses) and the logical-axis rules (for activation constraints)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        yield


def scope(trainer: Trainer):
    return scope_of(trainer.mesh)


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


def run(job_module, config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the job until config.train.steps; returns the last logged metrics (host floats) and
    the last evaluation's results. The workdir is locked for the run (W/LOCK): a second run on it
    refuses to start."""
    workdir = paths.resolve(workdir)
    mesh = make_mesh(config)
    validate(job_module, config, sharding.batch_size_of(mesh), jax.process_count())  # before the lock, before compiling
    if config_lib.auto_fields(config):
        raise ConfigError(f"{', '.join(config_lib.auto_fields(config))}: 'auto' is chosen before a run by "
                          "vtp_jax.jobs.run (the compile-plan search, train/aot.py); runner.run takes set values")
    # A run starts from no mesh even when another job's run calls it (the study runs pretrain,
    # eval and dit inside its own): each job builds on its own mesh.
    with jax.set_mesh(None), checkpointing.WorkdirLock(workdir) as lock:
        return _run(job_module, config, workdir, lock, mesh)


def _run(job_module, config: ml_collections.ConfigDict, workdir: str, lock: checkpointing.WorkdirLock, mesh) -> dict:
    tr = build(job_module, config, mesh, workdir)
    config, mesh, job = tr.config, tr.mesh, tr.job
    if job.run is not None:
        with scope(tr):
            return job.run()
    t = config.train
    steps = t.steps if job.step is not None else 0
    rng = jax.random.key(config.seed)
    with scope(tr):
        data_iter = job.data() if job.data is not None and steps else None
        manager = checkpointing.Checkpoints(paths.join(workdir, "checkpoints"), t.keep_checkpoints, lock=lock,
                                            guard=checkpointing.DivergenceGuard(t.divergence_factor, job.eval_params))
        latest = None
        if job.step is not None and manager.all_steps():  # the newest step that verifies (falls back)
            abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                          jax.eval_shape(tr.init, rng), tr.shardings)
            latest, state = manager.restore(abstract_state, data_iter, config, paths.join(workdir, "config.json"))
            logging.info("restored step %s from %s", latest, manager.directory)
        if job.step is not None and (latest if latest is not None else 0) >= steps:
            logging.warning("nothing to do: the workdir is at step %d and train.steps=%d; checkpoints and export/ "
                            "left untouched", latest or 0, steps)
            return {}
        if latest is None:
            state = tr.init(rng)
            if job.start is not None:
                state = job.start(state)
        if job.step is not None:
            manager.begin(state)

        events = Events(workdir)
        # TensorBoard gets every scalar; the log gets one readable line per log step (`log_line`).
        writer = (metric_writers.AsyncWriter(metric_writers.SummaryWriter(events.logdir))
                  if jax.process_index() == 0 else metric_writers.MultiWriter([]))
        if jax.process_index() == 0:  # what the eval job and the study read back
            paths.write_text(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=1))
        if latest is None:
            writer.write_hparams({k: str(v) for k, v in config.to_dict().items()})
            if job.step is not None:
                parameter_overview.log_parameter_overview(job.eval_params(state))
        start = int(state.step) if hasattr(state, "step") else 0
        evaluators = evaluator.build(config, job.eval_target, mesh)
        results = {}

        def evaluate(step, all_of_them=False):
            out = {}
            for name, ev in evaluators.items():
                if all_of_them or step == steps or (ev.every and step % ev.every == 0):
                    t0 = time.perf_counter()
                    out.update({f"{ev.prefix}/{k}" if ev.prefix else k: v
                                for k, v in ev.run(job.eval_params(state)).items()})
                    logging.info("evaluator %s at step %d took %.1f s", name, step, time.perf_counter() - t0)
            if out:
                writer.write_scalars(step, out)
                logging.info("step %d evaluation: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in sorted(out.items())))
            return out

        preempt = Preemption()
        hooks = [periodic_actions.ReportProgress(num_train_steps=steps, writer=writer)]
        if t.profile_steps and jax.process_index() == 0:
            hooks.append(periodic_actions.Profile(num_profile_steps=t.profile_steps, logdir=events.logdir,
                                                  first_profile=start + 3))
        job_hooks = [periodic_actions.PeriodicCallback(every_steps=h.every, on_steps=[steps],
                                                       callback_fn=lambda step, t, fn=h.fn, **kw: fn(step, **kw))
                     for h in job.hooks if h.every]
        if t.eval_at_start and start == 0 and steps:  # the "before" numbers (W/metrics_start.json)
            _write_json(paths.join(workdir, "metrics_start.json"), evaluate(0, all_of_them=True))
        metrics, compiled, flops, peak, last_t = {}, None, float("nan"), float("nan"), None
        t_train = time.perf_counter()
        for step in range(start, steps):
            batch = sharding.global_batch(next(data_iter), mesh) if data_iter is not None else None
            if compiled is None:
                compiled = tr.step.lower(state, batch, job.consts).compile()
                flops = model_flops(tr.step, state, batch, job.consts)
                peak = peak_flops(jax.devices())
                logging.info("train step: %.3g matmul FLOPs per step, peak %.3g FLOP/s", flops, peak)
                last_t = time.perf_counter()
            state, metrics = compiled(state, batch, job.consts)
            manager.observe(metrics)
            done = step + 1
            for h in hooks:
                h(done)
            for h in job_hooks:
                h(done, state=state, batch=batch, writer=writer, workdir=workdir)
            if done % t.log_every == 0 or done == steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                step_time = (now - last_t) / (done - max(start, done - t.log_every))
                last_t = now
                metrics["mfu"] = flops / step_time / peak
                metrics["step_time"] = step_time
                if hasattr(data_iter, "counters"):
                    metrics.update({f"data/{k}": v for k, v in data_iter.counters().items()})
                writer.write_scalars(done, metrics)
                logging.info("%s", log_line(done, steps, metrics))
                if metrics.get("nonfinite_in_a_row", 0) >= t.max_nonfinite:
                    raise FloatingPointError(
                        f"{int(metrics['nonfinite_in_a_row'])} non-finite steps in a row at step {done} (limit "
                        f"train.max_nonfinite={t.max_nonfinite}); newest (healthy) checkpoint: {manager.latest_step()}")
            results.update(evaluate(done) if done < steps else {})
            if preempt.reached(done, manager):
                saved = manager.save(done, state, data_iter)
                manager.wait_until_finished()
                logging.warning("preempted: checkpoint at step %d %s, exiting", done, "saved" if saved else "not saved")
                writer.flush()
                events.sync()
                raise SystemExit(0)
            if done % t.checkpoint_every == 0 or done == steps:
                manager.save(done, state, data_iter, final=done == steps)
                writer.flush()
                events.sync()
        manager.wait_until_finished()
        if compiled is not None and jax.process_index() == 0:  # the compute spent: what the study plots against
            _write_json(paths.join(workdir, "cost.json"), {
                "flops_per_step": flops, "steps": steps, "steps_this_run": steps - start,
                "seconds_this_run": time.perf_counter() - t_train, "devices": jax.device_count()})
        results.update(evaluate(steps))
        if results:
            _write_json(paths.join(workdir, "metrics.json"), results)
        if job.export is not None:
            job.export(state, paths.join(workdir, "export"))
        writer.flush()
        events.sync()
    return {**metrics, **results}


def log_line(step: int, steps: int, metrics: dict) -> str:
    """'step 300/300: loss .. l_clip .. | lr .. step_time .. mfu .. | the rest': the losses first,
    then the schedule and speed, then diagnostics; data counters only when non-zero (TensorBoard
    has them all)."""
    losses = [k for k in metrics if k == "loss" or k.startswith("l_")]
    speed = [k for k in ("lr", "step_time", "mfu") if k in metrics]
    rest = sorted(k for k in metrics if k not in losses and k not in speed
                  and not (k.startswith("data/") and metrics[k] == 0))
    groups = [sorted(losses, key=lambda k: (k != "loss", k)), speed, rest]
    return f"step {step}/{steps}: " + " | ".join(", ".join(f"{k} {metrics[k]:.6g}" for k in g) for g in groups if g)


class Events:
    """Where TensorBoard events and profiles go: the workdir itself when it is local; for a remote
    one (gs://) a local folder copied into it at every checkpoint and at the end, since TensorFlow's
    writer has its own gs:// client (its credentials chain, no emulator) rather than the path layer.
    Process 0 copies."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.logdir = tempfile.mkdtemp(prefix="vtp_jax_events_") if paths.is_remote(workdir) else workdir

    def sync(self) -> None:
        if self.logdir != self.workdir and jax.process_index() == 0:
            paths.sync_folder(self.logdir, self.workdir)


def write_images(writer, workdir: str, step: int, name: str, rows) -> None:
    """(N, H, W, 3) uint8 pictures to TensorBoard and, stacked, to workdir/name/<step>.png
    (process 0 writes; every process calls it)."""
    rows = np.asarray(rows)
    writer.write_images(step, {name: rows})
    if jax.process_index() == 0:
        png = io.BytesIO()
        Image.fromarray(np.concatenate(list(rows), 0)).save(png, format="PNG")
        paths.write_bytes(paths.join(workdir, name, f"{step:07d}.png"), png.getvalue())


def write_image_rows(writer, workdir: str, step: int, name: str, *columns, n: int = 8) -> None:
    """Rows of side-by-side images (input | reconstruction | ...), each column an ImageNet-
    normalised, globally sharded batch, gathered from every host and written by `write_images`."""
    columns = multihost_utils.process_allgather(columns, tiled=True)
    write_images(writer, workdir, step, name, images.side_by_side(columns, n))


def _write_json(path, metrics):
    if jax.process_index() == 0 and metrics:
        paths.write_json(path, {k: float(v) for k, v in metrics.items()}, indent=1, sort_keys=True)
