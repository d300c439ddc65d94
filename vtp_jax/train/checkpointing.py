"""Nothing lost, nothing silently wrong: the workdir lock, verified checkpoints that fall back, and
the divergence guard that decides which states are worth a checkpoint.

  WorkdirLock      W/LOCK names the run that owns the workdir (host, pid, start time); a second
                   run refuses to start, a lock whose process is gone (same host) is taken over.
  Checkpoints      the orbax CheckpointManager of W/checkpoints whose every step also holds the
                   `integrity` item: a checksum of every array of the state, computed on device
                   from the arrays being saved. A restore verifies them; a step that cannot be
                   read or fails verification is reported in one line and the run falls back to
                   the newest good step (the bad ones are moved to W/bad_checkpoints, never deleted).
  DivergenceGuard  a checkpoint is written only for a healthy stretch of steps (see the config
                   comment of train.divergence_factor), so the newest checkpoint is always one
                   to resume from and rotation never removes the last healthy state.

Orbax has no verification of its own to switch on: its zarr3 crc32c covers only the shard index,
and the default OCDBT/zarr2 layout reads flipped bytes back without complaint.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import re
import socket
import sys
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from vtp_jax.checkpoints.integrity import INTEGRITY, checksums, leaf_names, verify
from vtp_jax.data import pipeline

LOCK_NAME = "LOCK"
QUARANTINE = "bad_checkpoints"  # W/<this>/<step>: checkpoints that failed to restore or verify
HISTORY = 100  # healthy losses the divergence guard measures a stretch against
# Files orbax needs to read a state back; named when missing from a step that cannot be read.
METADATA_FILES = ("state/_METADATA", "state/manifest.ocdbt")


class RunError(RuntimeError):
    """A run that must not start or go on; the message is one line that says why."""


class WorkdirLocked(RunError):
    """Another live run owns the workdir."""


class BadCheckpoints(RunError):
    """Checkpoints exist but none reads back and verifies: never a silent start from scratch."""


class CheckpointMismatch(RunError):
    """A checkpoint that reads but holds another model than the config builds."""


class Diverged(FloatingPointError):
    """The run ended in a diverging stretch: no checkpoint, no export."""


# ------------------------------------------------------------------------------------------------
# The workdir lock.
# ------------------------------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a local process, from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool | None:
    """Whether the process that wrote `holder` still runs; None when it ran on another host."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    stat = _proc_stat(pid)
    if stat is not None:
        state, started = stat
        if state in ("Z", "X"):  # exited, not yet reaped
            return False
        if holder.get("proc_start") not in (None, started):  # the pid was reused
            return False
    return True


def _describe(holder: dict) -> str:
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


def _create_exclusive(path: epath.Path, text: str, token: str) -> bool:
    """Writes `text` to `path` only if no file is there; True if we wrote it."""
    try:
        with path.open("x") as f:
            f.write(text)
        return True
    except FileExistsError:
        return False
    except Exception:  # noqa: BLE001  backends without exclusive create (object stores): write, read back
        if path.exists():
            return False
        path.write_text(text)
        time.sleep(0.5)
        return _read_json(path, tries=3).get("token") == token


def _read_json(path: epath.Path, tries: int = 10) -> dict:
    """The lock's content; {} once it is gone or after `tries` unreadable reads (a writer caught
    between creating and writing the file gets 0.1 s per try to finish)."""
    for i in range(tries):
        try:
            out = json.loads(path.read_text())
            return out if isinstance(out, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            if i + 1 < tries:
                time.sleep(0.1)
    return {}


class WorkdirLock:
    """W/LOCK: one run per workdir. Process 0 holds it; the other processes learn its verdict.

    Written through etils.epath (local paths, gs://). A lock whose process is gone (same host:
    no such pid, a zombie, or the pid reused by another process) is taken over with a warning;
    a lock from another host cannot be checked and is respected. Before every checkpoint the
    holder checks that the lock still names it (`verify`)."""

    def __init__(self, workdir):
        self.path = epath.Path(workdir) / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def _agree(self, error: str | None, what: str) -> None:
        """Raises `error` (process 0's) on every process of a multi-process run."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            if int(multihost_utils.broadcast_one_to_all(np.int32(error is not None))) and error is None:
                error = f"{self.path.parent}: process 0 {what} (see its log)"
        if error:
            raise WorkdirLocked(error)

    def acquire(self):
        error = None
        if jax.process_index() == 0:
            try:
                self._acquire()
            except WorkdirLocked as e:
                error = str(e)
        self._agree(error, "refused the workdir")

    def _acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stat = _proc_stat(os.getpid())
        me = dict(host=socket.gethostname(), pid=os.getpid(),
                  started=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                  proc_start=stat[1] if stat else None, token=self.token, command=" ".join(sys.argv)[:1000])
        text = json.dumps(me, indent=1)
        for _ in range(5):
            if _create_exclusive(self.path, text, self.token):
                self.held = True
                return
            holder = _read_json(self.path)
            if not holder and not self.path.exists():
                continue  # released meanwhile
            alive = _alive(holder) if holder else False
            if alive is False:
                logging.warning("%s: taking over the stale lock of %s: that process is gone", self.path,
                                _describe(holder) if holder else "an unreadable lock file")
                if _read_json(self.path).get("token") == holder.get("token"):  # not retaken meanwhile
                    self.path.unlink(missing_ok=True)
                continue
            where = "" if alive else " on another host, which this host cannot check"
            raise WorkdirLocked(f"workdir {self.path.parent} is in use by another run ({_describe(holder)}{where}): "
                                f"refusing to start; stop that run first, or delete {self.path} if it is gone")
        raise WorkdirLocked(f"{self.path}: could not take the lock (other runs keep taking it)")

    def verify(self):
        """Raises WorkdirLocked if the lock no longer names this run (another run took it over)."""
        error = None
        if jax.process_index() == 0 and self.held:
            holder = _read_json(self.path)
            if not holder and not self.path.exists():  # deleted by hand: nobody else holds it, take it again
                self.held = False
                try:
                    self._acquire()
                    logging.warning("%s had been deleted while this run held it: taken again", self.path)
                except WorkdirLocked as e:
                    error = str(e)
            elif holder.get("token") != self.token:
                self.held = False
                error = (f"workdir lock {self.path} now names another run ({_describe(holder) if holder else 'none'}): "
                         "stopping without writing to the workdir")
        self._agree(error, "lost the workdir lock")

    def release(self):
        if not self.held:
            return
        self.held = False
        try:
            if _read_json(self.path).get("token") == self.token:
                self.path.unlink(missing_ok=True)
        except OSError as e:
            logging.warning("%s: could not remove the lock: %s", self.path, e)


# ------------------------------------------------------------------------------------------------
# What a checkpoint that does not fit the config differs in.
# ------------------------------------------------------------------------------------------------
def _flat(d, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved_json, config) -> list[str] | None:
    """'field: X then, Y now' for every field where `config` differs from the config file a run
    wrote (W/config.json); None without a readable file."""
    try:
        saved = json.loads(epath.Path(saved_json).read_text())
    except (OSError, ValueError):
        return None
    then, now = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
    missing = object()
    return [f"{k}: {then.get(k, '(absent)')!r} then, {now.get(k, '(absent)')!r} now"
            for k in sorted(then.keys() | now.keys()) if then.get(k, missing) != now.get(k, missing)]


def _abstract_leaves(abstract_state) -> dict[str, tuple]:
    out = {}
    for name, x in zip(leaf_names(abstract_state), jax.tree.leaves(abstract_state)):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):  # stored as its key data
            x = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
        out[name] = (tuple(x.shape), np.dtype(x.dtype).name)
    return out


def tree_differences(state_dir, abstract_state) -> list[str] | None:
    """How the arrays saved in `state_dir` differ from `abstract_state` (names, shapes, dtypes);
    [] if they match, None if the checkpoint's metadata cannot be read."""
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(os.fspath(state_dir))
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
    except Exception:  # noqa: BLE001  unreadable metadata: damage, not a config change
        return None
    if not isinstance(tree, dict):
        return None
    saved = {m.name: (tuple(m.shape), np.dtype(m.dtype).name)
             for m in jax.tree.leaves(tree) if hasattr(m, "name") and hasattr(m, "shape")}
    ours = _abstract_leaves(abstract_state)
    diffs = [f"{k} only in the checkpoint" for k in sorted(saved.keys() - ours.keys())]
    diffs += [f"{k} not in the checkpoint" for k in sorted(ours.keys() - saved.keys())]
    diffs += [f"{k}: {saved[k][1]}{list(saved[k][0])} in the checkpoint, {ours[k][1]}{list(ours[k][0])} now"
              for k in sorted(saved.keys() & ours.keys()) if saved[k] != ours[k]]
    return diffs


def _first_line(e: BaseException, limit: int = 240) -> str:
    """One line of an exception: orbax / TensorStore errors span dozens."""
    text = str(e).strip()
    # TensorStore's spec names the folder (an absolute path or URL), then the array it failed on.
    arrays = [p for p in re.findall(r"'path': '([^']+?)/?'", text) if not p.startswith("/") and "://" not in p]
    line = text.splitlines()[0] if text else ""
    line = line.split(" See full TensorStore details")[0]
    line = f"{type(e).__name__}: {line[:limit]}{'...' if len(line) > limit else ''}"
    return f"array {arrays[-1]}: {line}" if arrays else line


def _listing(items: list[str], n: int = 6) -> str:
    return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")


# ------------------------------------------------------------------------------------------------
# The divergence guard.
# ------------------------------------------------------------------------------------------------
_max_abs = jax.jit(lambda leaves: jnp.max(jnp.stack([jnp.max(jnp.abs(x)).astype(jnp.float32) for x in leaves])))


def parameter_scale(params) -> float:
    """The largest |value| over the floating-point arrays of `params`; NaN if any is NaN."""
    leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating) and x.size]
    return float(np.asarray(_max_abs(leaves).addressable_data(0))) if leaves else 0.0


class DivergenceGuard:
    """Whether the state at a checkpoint step comes from a healthy stretch (the steps since the
    last checkpoint): no update skipped as non-finite, every loss finite, and with `factor` > 0
    |loss| <= factor x the median |loss| of the last HISTORY steps of earlier healthy stretches
    (a run's first stretch: x its first loss) and the largest parameter magnitude (of
    `params_of(state)`, the job's parameters) <= factor x that of the last healthy state (the one
    the run started from, or the last checkpoint). The loss of step N is computed before step N's
    update; the magnitude check covers that update.
    An unhealthy stretch gets no checkpoint; a later healthy one (a recovered spike) does. The
    loss history travels with each checkpoint."""

    def __init__(self, factor: float, params_of=lambda state: state):
        self.factor = factor
        self.params_of = params_of
        self.history: list[float] = []
        self.scale: float | None = None  # parameter_scale of the last healthy state
        self._pending: list = []  # (loss, nonfinite_in_a_row) device scalars: no sync per step

    def begin(self, state) -> None:
        """The state the run starts from (restored or initialised) is the healthy reference."""
        self.scale = parameter_scale(self.params_of(state))

    def observe(self, metrics: dict) -> None:
        self._pending.append((metrics.get("loss"), metrics.get("nonfinite_in_a_row")))

    def check(self, state=None) -> tuple[bool, str]:
        """(healthy?, why not) for the stretch observed since the last check, which it ends;
        `state`: the state about to be saved."""
        pending, self._pending = jax.device_get(self._pending), []
        losses = [float(loss) for loss, _ in pending if loss is not None]
        skipped = sum(int(n) > 0 for _, n in pending if n is not None)
        if skipped:
            return False, f"{skipped} update(s) skipped as non-finite since the last checkpoint"
        if not all(np.isfinite(losses)):
            return False, "a non-finite loss since the last checkpoint"
        if self.factor and losses:
            ref = float(np.median(np.abs(self.history[-HISTORY:]))) if self.history else abs(losses[0])
            worst = max(abs(x) for x in losses)
            if ref > 0 and worst > self.factor * ref:
                return False, (f"loss {worst:.4g} since the last checkpoint is over train.divergence_factor="
                               f"{self.factor:g} x {ref:.4g} (median of the recent healthy losses)")
        scale = parameter_scale(self.params_of(state)) if state is not None else None
        if scale is not None and not np.isfinite(scale):
            return False, "non-finite parameters"
        if self.factor and scale is not None and self.scale and scale > self.factor * self.scale:
            return False, (f"largest parameter magnitude {scale:.4g} is over train.divergence_factor={self.factor:g} "
                           f"x {self.scale:.4g} (that of the last healthy state)")
        self.history = (self.history + losses)[-HISTORY:]
        self.scale = scale if scale is not None else self.scale
        return True, ""


# ------------------------------------------------------------------------------------------------
# Verified checkpoints.
# ------------------------------------------------------------------------------------------------
def _everywhere(ok: bool) -> bool:
    """Whether `ok` holds on every process (all processes call this at the same point)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


@functools.cache  # once per process
def _write_replicas_whole():
    """Orbax splits a replicated array into one slice per replica so that hosts share its writing
    (replica-parallel); each slice is a small program compiled per array shape, on the first save.
    With one process there is no other host to share with, and the compiles are all the cost: the
    demo's first save on 8 devices compiled 240 programs and blocked 28.6 s instead of 2.3
    (benchmarks/RESULTS.md, "Saving replicated arrays"). Multi-process runs keep orbax's default."""
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpoints:
    """W/checkpoints: orbax steps holding the state, the data iterator's position and the
    `integrity` item; saves go through the divergence guard and the workdir lock."""

    def __init__(self, directory, keep: int, *, lock: WorkdirLock | None = None,
                 guard: DivergenceGuard | None = None):
        self.directory = epath.Path(directory)
        self.lock = lock
        self.guard = guard or DivergenceGuard(0.0)
        if jax.process_count() == 1:
            _write_replicas_whole()
        self.manager = ocp.CheckpointManager(
            os.fspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True))

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self):
        return self.manager.all_steps()

    def wait_until_finished(self):
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def begin(self, state) -> None:
        """The state the run starts from, the divergence guard's healthy reference."""
        self.guard.begin(state)

    def observe(self, metrics: dict) -> None:
        """Every step's metrics, for the divergence guard."""
        self.guard.observe(metrics)

    # -- saving --------------------------------------------------------------------------------
    def save(self, step: int, state, data_iter=None, *, final: bool = False) -> bool:
        """Saves `step` if the stretch that led to it is healthy; False (and a warning) if not.
        `final`: the run's last step, where an unhealthy stretch raises Diverged instead, so
        that no export of diverged parameters follows."""
        ok, why = self.guard.check(state)
        if not ok:
            last = self.manager.latest_step()
            if final:
                raise Diverged(f"the run ended in a diverging stretch ({why}): step {step} not checkpointed, export/ "
                               f"not written; the newest checkpoint is the healthy step {last}")
            logging.warning("step %d not checkpointed: %s; the newest checkpoint stays the healthy step %s", step,
                            why, last)
            return False
        if self.lock is not None:
            self.lock.verify()
        integrity = dict(version=1, checksums=checksums(state), losses=list(self.guard.history))
        items = dict(state=ocp.args.StandardSave(state), **{INTEGRITY: ocp.args.JsonSave(integrity)})
        if data_iter is not None:
            items["data"] = pipeline.checkpoint_save_args(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**items))
        return True

    # -- restoring -----------------------------------------------------------------------------
    def _has_integrity(self, step: int) -> bool:
        return (self.directory / str(step) / INTEGRITY).exists()

    def restore(self, abstract_state, data_iter=None, config=None, saved_config=None):
        """(step, state) of the newest step that reads back and verifies; (None, None) without
        checkpoints. Each step that fails is reported in one line and, once an older one
        verified, moved to W/bad_checkpoints. Checkpoints none of which verifies raise
        BadCheckpoints; a checkpoint of another model raises CheckpointMismatch naming the
        config fields that differ from `saved_config` (W/config.json)."""
        failures = []
        steps = sorted(self.manager.all_steps(), reverse=True)
        checked = [s for s in steps if self._has_integrity(s)]
        for step in steps:
            problem, out = self._restore_step(step, abstract_state, data_iter, config, saved_config, checked)
            if not _everywhere(problem is None) and problem is None:  # each process reads its own shards
                problem = "unusable on another process (see its log)"
            if problem is None:
                self._quarantine([s for s, _ in failures])
                if INTEGRITY in out:
                    self.guard.history = [float(x) for x in out[INTEGRITY].get("losses", [])][-HISTORY:]
                return step, out["state"]
            logging.error("checkpoint step %d in %s is unusable: %s", step, self.directory, problem)
            failures.append((step, problem))
        if failures:
            raise BadCheckpoints(f"no checkpoint in {self.directory} is usable ("
                                 + "; ".join(f"step {s}: {p}" for s, p in failures)
                                 + "): refusing to start from scratch over them; move them away to do that")
        return None, None

    def _restore_step(self, step, abstract_state, data_iter, config, saved_config, checked):
        """(problem or None, restored items)."""
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        has_integrity = step in checked
        if has_integrity:
            items[INTEGRITY] = ocp.args.JsonRestore()
        elif any(s < step for s in checked):  # written after verification existed: must have it
            return f"its {INTEGRITY} item (the checksums) is missing", None
        if data_iter is not None:
            items["data"] = pipeline.checkpoint_restore_args(data_iter)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001  orbax / TensorStore raise many types on damaged files
            diffs = tree_differences(self.directory / str(step) / "state", abstract_state)
            if diffs:  # it reads, but holds another model: the config changed, not the files
                raise CheckpointMismatch(self._mismatch(step, diffs, config, saved_config, e)) from None
            missing = [f for f in METADATA_FILES if not (self.directory / str(step) / f).exists()]
            said = f"{', '.join(missing)} missing; " if missing else ""
            return f"cannot be read ({said}{_first_line(e)})", None
        if not has_integrity:
            logging.warning("checkpoint step %d in %s has no checksums (written before they existed): restored "
                            "unverified", step, self.directory)
            return None, out
        problem = verify(out["state"], out[INTEGRITY])
        return problem, out

    def _mismatch(self, step, diffs, config, saved_config, error) -> str:
        fields = config_differences(saved_config, config) if saved_config and config is not None else None
        if fields is None:
            said = "no readable config.json of the run that wrote it to compare with"
        elif fields:
            said = f"the config differs from {saved_config} in {_listing(fields)}"
        else:
            said = f"the config equals {saved_config}"
        return (f"checkpoint step {step} in {self.directory} does not fit this config: {said}; arrays: "
                f"{_listing(diffs, 3)} (orbax: {_first_line(error, 120)})")

    def _quarantine(self, steps: list[int]) -> None:
        """Moves unusable steps out of the way (a later save of the same step, rotation)."""
        if not steps:
            return
        if jax.process_index() == 0:
            root = self.directory.parent / QUARANTINE
            root.mkdir(parents=True, exist_ok=True)
            for s in steps:
                dest, n = root / str(s), 1
                while dest.exists():
                    dest, n = root / f"{s}.{n}", n + 1
                (self.directory / str(s)).rename(dest)
                logging.warning("moved unusable checkpoint step %d to %s", s, dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("vtp_jax.checkpointing.quarantine")
        self.manager.reload()
