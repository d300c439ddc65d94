"""Compile a job for a TPU topology on a CPU before renting the pod: does it fit, how fast can it be.

    python -m vtp_jax.main --config=configs/vtp_l.py --config.train.compile_for=v5p-128 --workdir=W

`train.compile_for` names the topology as Cloud does (v4-N and v5p-N count TensorCores, two per
chip; v5e-N / v5litepod-N and v6e-N count chips) or as a chip grid ("v5p:4x4x4", "v6e:16x16");
`train.compile_slices` of them make a multi-slice run (with train.dcn_mesh). libtpu (`pip install
-e ".[tpu]"`) gives compile-only devices of that topology on a Linux x86 machine without a TPU. The
job is built as a launch builds it (validation against the topology's hosts, the mesh laid on its
chips, shardings from the logical axis names, the state, batch and constant shapes) but from shapes
alone (`make_job(..., abstract=True)`: no data or weight file is read), its step is lowered and
compiled by the TPU compiler, and nothing is allocated or run. Printed and in W/compiled.json, per
chip: the compiler's memory (arguments, temporaries, outputs) against the chip's HBM less
train.hbm_margin, FLOPs, the step time the chip's bf16 peak allows at 100% and 50% MFU (a bound:
step time is not measured), the collectives of the compiled program, and the compile time.
The exit status is 0 only when the step fits: a launch script can gate on it.

`train.accum_steps = 0` (auto) takes the smallest micro-batch count that fits, and
`model.remat = 'auto'` (or dit.remat) tries the policies too and keeps the fitting combination
with the fewest FLOPs per step (recomputation costs time). A real launch with either resolves them
the same way against its own devices' memory limit before training (`resolve`).

FLOPs: XLA's cost analysis counts a loop body once (a scanned block stack, the accumulation scan)
and shows no rematerialised recompute, so the figure used is the step's jaxpr count (matmuls and
convolutions, scans x their length, recomputation included: `runner.model_flops`); XLA's own
number is kept beside it. Collectives: every all-reduce, all-gather, reduce-scatter, all-to-all and
collective-permute of the compiled HLO with the bytes of its result, times the trip count of the
loops around it.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
import time

import jax
import ml_collections
from absl import logging

from vtp_jax import paths, sharding
from vtp_jax.train import runner

GiB = float(1 << 30)
# Cloud accelerator type prefix -> (libtpu's generation name, physical dimensions, TensorCores per
# chip counted by the Cloud name's number).
GENERATIONS = {"v4": ("v4", 3, 2), "v5p": ("v5p", 3, 2), "v5e": ("v5e", 2, 1), "v5litepod": ("v5e", 2, 1),
               "v6e": ("v6e", 2, 1)}
REMATS = ("none", "dots", "full")
REMAT_FIELDS = ("model.remat", "dit.remat")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


class DoesNotFit(RuntimeError):
    """The compiled step needs more memory than the device has (the message says how much)."""


# ------------------------------------------------------------------------------------------------
# Topologies.
# ------------------------------------------------------------------------------------------------
def chip_grid(name: str) -> tuple[str, tuple[int, ...]]:
    """('v5p', (4, 4, 4)) for "v5p-128" or "v5p:4x4x4". Cloud names map to the default slice shape
    of their chip count (a power of two); other shapes are written as a grid."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)([-:])([0-9x]+)", name.strip().lower())
    if not m:
        raise runner.ConfigError(
            f"train.compile_for={name!r}: expected a Cloud TPU type (v4-N, v5p-N, v5e-N, v5litepod-N, v6e-N) or a "
            "chip grid (v5p:4x4x4, v6e:16x16)")
    gen, dims, cores = GENERATIONS[m[1]]
    if m[2] == ":":
        grid = tuple(int(x) for x in m[3].split("x"))
        if len(grid) != dims or min(grid) < 1:
            raise runner.ConfigError(f"train.compile_for={name!r}: a {gen} chip grid has {dims} sizes, e.g. "
                                     f"{gen}:{'x'.join(['4'] * dims)}")
        return gen, grid
    count = int(m[3]) if m[3].isdigit() else 0
    chips = count // cores
    if not count or count % cores or chips & (chips - 1) or chips < (4 if dims == 3 else 1):
        raise runner.ConfigError(
            f"train.compile_for={name!r}: no default slice shape for it; write the chip grid Cloud gives the slice "
            f"(gcloud compute tpus tpu-vm describe NAME --format='value(acceleratorConfig.topology)'), e.g. "
            f"{gen}:{'4x4x12' if dims == 3 else '8x16'}")
    grid = [2, 2, 1] if dims == 3 else [1, 1]
    while math.prod(grid) < chips:  # double the last of the smallest sizes: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...
        i = max(j for j, g in enumerate(grid) if g == min(grid))
        grid[i] *= 2
    return gen, tuple(grid)


def topology_devices(name: str, slices: int = 1) -> list:
    """The compile-only devices of `slices` slices of TPU topology `name` (one per chip: v4 and
    v5p as megacore; torus wraparound where Cloud slices have it)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # off a TPU VM there is no metadata server to ask
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no TPU is held, other processes may plan
    try:
        from jax.experimental import topologies  # lazy: needs libtpu, the [tpu] extra, only for compile_for
    except ImportError as e:
        raise runner.ConfigError(f"train.compile_for needs libtpu: pip install -e \".[tpu]\" ({e})") from None
    gen, grid = chip_grid(name)
    kw = {}
    if len(grid) == 3:
        kw = dict(chip_config_name="megacore", wrap=(min(grid) >= 4,) * 3)
    else:
        kw = dict(wrap=(grid[0] == 16, grid[1] == 16, False))
    if slices > 1:
        kw["num_slices"] = slices
    try:
        return list(topologies.get_topology_desc(topology_name=f"{gen}:{'x'.join(map(str, grid))}", platform="tpu",
                                                 **kw).devices)
    except Exception as e:  # libtpu missing or refusing the shape: one line
        raise runner.ConfigError(f"train.compile_for={name!r} ({gen}:{'x'.join(map(str, grid))} x {slices}): libtpu "
                                 f"cannot describe it ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                 "pip install -e \".[tpu]\"") from None


def memory_limit(device) -> float | None:
    """Bytes a device may hold: what it reports (`memory_stats()['bytes_limit']`), else its HBM by
    kind (compile-only TPUs), else None (CPU: no limit known)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # compile-only devices and some backends do not implement it
        stats = {}
    if stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    hbm = runner.by_kind(runner.HBM_BYTES, device.device_kind) if device.platform != "cpu" else None
    return None if hbm is None else float(hbm)


# ------------------------------------------------------------------------------------------------
# One compiled step.
# ------------------------------------------------------------------------------------------------
_RECORDS: dict = {}  # (config, devices, mesh) -> record: a program is compiled once per process
_PLAN_FIELDS = ("compile_for", "compile_slices", "hbm_margin")  # where and how to plan: not the step


def compile_step(job_module, config: ml_collections.ConfigDict, mesh) -> dict | None:
    """Builds the job from shapes on `mesh` and compiles its step; its memory, FLOPs and
    collectives per device, or None for a job without a train step."""
    fields = json.loads(config.to_json_best_effort())
    for name in _PLAN_FIELDS:
        fields.get("train", {}).pop(name, None)
    key = (json.dumps(fields, sort_keys=True), tuple(d.id for d in mesh.devices.flat), mesh.devices.shape,
           mesh.devices.flat[0].device_kind)
    if key not in _RECORDS:
        _RECORDS[key] = _compile_step(job_module, config, mesh)
    return _RECORDS[key]


def _compile_step(job_module, config, mesh):
    t0 = time.perf_counter()
    tr = runner.build(job_module, config, mesh, abstract=True)
    if tr.step is None:
        return None
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)  # made outside the mesh: nothing runs on it
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, len(v.shape)))
             for k, v in tr.job.batch_spec.items()}
    n = mesh.devices.size
    with runner.scope(tr):
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             jax.eval_shape(tr.init, key), tr.shardings)
        flops = runner.model_flops(tr.step, state, batch, tr.consts)
        record = dict(accum_steps=config.train.accum_steps, remat=remat_of(config), flops_per_chip=flops / n,
                      accum_choices=list(tr.job.accum_choices))
        try:
            compiled = tr.step.lower(state, batch, tr.consts).compile()
        except jax.errors.JaxRuntimeError as e:
            needs = _out_of_memory(str(e))
            if needs is None:
                raise
            # The TPU compiler refuses a program whose temporaries exceed the chip's HBM: a size too.
            return dict(record, memory=dict(temporaries=needs, total=needs), xla_flops_per_chip=float("nan"),
                        collectives={}, largest_arguments=[], compile_seconds=time.perf_counter() - t0,
                        compiler_said=str(e).splitlines()[0][:300])
    m = compiled.memory_analysis()
    memory = dict(arguments=m.argument_size_in_bytes, temporaries=m.temp_size_in_bytes,
                  outputs=m.output_size_in_bytes - m.alias_size_in_bytes, program=m.generated_code_size_in_bytes)
    memory["total"] = sum(memory.values())
    hlo = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    return dict(record, memory=memory, xla_flops_per_chip=float(cost.get("flops", float("nan"))),
                collectives=collectives(hlo), loops=loops(hlo), largest_arguments=arguments(hlo)[:8],
                compile_seconds=time.perf_counter() - t0)


def _out_of_memory(message: str) -> float | None:
    """Bytes of temporaries in the TPU compiler's 'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the
    total memory required for HLO temporaries (21.99G) exceeds available HBM (15.75G)', else None:
    a lower bound of the step's memory (its arguments are not counted in it)."""
    m = re.search(r"RESOURCE_EXHAUSTED.*?\(([0-9.]+)([KMGT])\)", message, re.S)
    return None if m is None else float(m[1]) * 1024 ** "KMGT".index(m[2]) * 1024


def _computations(hlo: str) -> tuple[str | None, dict[str, list[str]]]:
    """(entry name, {computation name: its instruction lines}) of an HLO module's text."""
    comps, entry, current = {}, None, None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head:
            current = comps.setdefault(head[2], [])
            entry = head[2] if head[1] else entry
        elif current is not None and "=" in line:
            current.append(line)
    return entry, comps


def _instruction(line: str):
    """(result type, opcode) of an HLO instruction line, or None."""
    m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.*?)\s([a-z][a-z0-9\-]*)\(", line)
    return (m[1], m[2]) if m else None


def arguments(hlo: str) -> list[tuple[str, int]]:
    """(name, bytes per device) of a compiled program's arguments, largest first: the entry
    computation's parameters with their sharded shapes and the names jit gave them
    ("state.params['trunk']...", "batch['clip_images']")."""
    entry, comps = _computations(hlo)
    out = []
    for line in comps.get(entry, []):
        inst = _instruction(line)
        if inst and inst[1] == "parameter":
            name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', line)
            out.append(((name[1] if name else "?").replace("\\'", "'"), _bytes(inst[0])))
    return sorted(out, key=lambda x: -x[1])


def _trip_count(line: str, comps: dict[str, list[str]]) -> int:
    """Iterations of the while loop on `line`: XLA's known_trip_count, or, where the TPU compiler
    dropped it, N from a condition `i < N` with N a constant (the loops jax emits count from 0)."""
    n = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if n:
        return int(n[1])
    cond = re.search(r"condition=%?([\w.\-]+)", line)
    lines = comps.get(cond[1], []) if cond else []
    constants = dict(re.findall(r"%?([\w.\-]+) = s32\[\][^ ]* constant\((\d+)\)", "\n".join(lines)))
    for l in lines:
        root = re.search(r"ROOT .*compare\(%?[\w.\-]+, %?([\w.\-]+)\), direction=LT", l)
        if root and root[1] in constants:
            return int(constants[root[1]])
    return 1


def loops(hlo: str) -> list[int]:
    """Trip counts of the while loops in a compiled HLO module (the accumulation loop among them
    unless the compiler unrolled it)."""
    _, comps = _computations(hlo)
    return [_trip_count(l, comps) for lines in comps.values() for l in lines
            if (inst := _instruction(l)) and inst[1] == "while"]


def collectives(hlo: str) -> dict[str, dict]:
    """{kind: {count, bytes}} of the collectives a compiled HLO module runs per call: each op's
    result bytes, times the trip count of every loop around it (async pairs counted once, at
    their -done)."""
    entry, comps = _computations(hlo)
    ops, calls = {}, {}
    for name, lines in comps.items():
        ops[name], calls[name] = [], []
        for line in lines:
            inst = _instruction(line)
            if not inst:
                continue
            result, kind = inst
            base = kind[:-5] if kind.endswith("-done") else kind
            if base in COLLECTIVES and not kind.endswith("-start"):
                ops[name].append((base, _bytes(result)))
            trips = _trip_count(line, comps) if kind == "while" else 1
            for attr in ("calls", "body", "to_apply", "branch_computations", "called_computations"):
                for group in re.findall(attr + r"=\{?([%\w.\-, ]+)\}?", line):
                    calls[name] += [(callee, trips) for callee in re.findall(r"%?([\w.\-]+)", group)]
    memo: dict[str, dict] = {}

    def walk(name, stack=()):
        if name in memo or name not in ops or name in stack:
            return memo.get(name, {})
        out: dict[str, list] = {}
        for kind, b in ops[name]:
            out.setdefault(kind, [0, 0])
            out[kind][0] += 1
            out[kind][1] += b
        for callee, trips in calls[name]:
            for kind, (count, b) in walk(callee, stack + (name,)).items():
                out.setdefault(kind, [0, 0])
                out[kind][0] += trips * count
                out[kind][1] += trips * b
        memo[name] = out
        return out

    return {kind: {"count": c, "bytes": b} for kind, (c, b) in walk(entry).items()} if entry else {}


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}


def _bytes(result_type: str) -> int:
    """Bytes of an HLO result type ('bf16[8,128]{...}' or a tuple of them)."""
    total = 0.0
    for dtype, dims in re.findall(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z0-9]*)?)\[([0-9,]*)\]", result_type):
        size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4)
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


# ------------------------------------------------------------------------------------------------
# What fits.
# ------------------------------------------------------------------------------------------------
def remat_field(config) -> str | None:
    """The config's remat field (model.remat for tokenizers, dit.remat for the DiT), if any."""
    return next((f for f in REMAT_FIELDS if "remat" in config.get(f.split(".")[0], {})), None)


def remat_of(config) -> str | None:
    field = remat_field(config)
    return None if field is None else config[field.split(".")[0]].remat


def _with(config, accum_steps: int | None = None, remat: str | None = None):
    c = config.copy_and_resolve_references()
    if accum_steps is not None:
        c.train.accum_steps = accum_steps
    if remat is not None:
        c[remat_field(c).split(".")[0]].remat = remat
    return c


def predict_accum(k1: int, total1: float, k2: int, total2: float, choices, limit: float) -> int | None:
    """The smallest k of `choices` whose total a + b / k fits `limit`, with a and b fitted to two
    compiled totals (the micro-batch's activations shrink as 1 / k, the state does not)."""
    b = (total1 - total2) / (1 / k1 - 1 / k2)
    a = total1 - b / k1
    return next((k for k in sorted(choices) if a + b / k <= limit), None)


def smallest_fit(compile_k, choices, limit: float) -> tuple[int | None, dict]:
    """(smallest k of `choices` whose compiled step fits `limit`, {k: record} compiled on the way).
    A few compiles: the smallest k; if it does not fit, the largest; then the k the two predict
    (`predict_accum`), stepping up until one fits and down while the next smaller one fits too
    (memory is not exactly linear in 1 / k: seen on TPU, k = 1 holds far more than its micro-batch
    share, so the prediction can land above the smallest k that fits)."""
    choices, records = sorted(choices), {}

    def fits(k):
        if k not in records:
            records[k] = compile_k(k)
            logging.info("accum_steps=%d: %.2f GiB per device (limit %.2f)", k, records[k]["memory"]["total"] / GiB,
                         limit / GiB)
        return records[k]["memory"]["total"] <= limit

    if fits(choices[0]):
        return choices[0], records
    if len(choices) == 1 or not fits(choices[-1]):
        return None, records
    lo, hi = choices[0], choices[-1]
    guess = predict_accum(lo, records[lo]["memory"]["total"], hi, records[hi]["memory"]["total"], choices, limit) or hi
    k = next(k for k in choices[choices.index(guess):] if fits(k))  # the largest choice fits: one does
    while k != lo and choices[choices.index(k) - 1] not in records and fits(choices[choices.index(k) - 1]):
        k = choices[choices.index(k) - 1]
    return k, records


def search(job_module, config, mesh, limit: float | None) -> tuple[dict | None, list[dict], str]:
    """The step to run: (chosen record or None, every record compiled, why). train.accum_steps = 0
    and a remat of 'auto' are searched; set values are compiled as they are."""
    inf = float("inf") if limit is None else limit
    remats = REMATS if remat_of(config) == "auto" else (remat_of(config),)
    k_auto = config.train.get("accum_steps", 1) == 0
    tried, fitting = [], {}  # fitting: remat -> the record of its smallest fitting k
    for remat in remats:
        base = _with(config, accum_steps=1 if k_auto else None, remat=remat)
        first = compile_step(job_module, base, mesh)
        if first is None:
            return None, [], f"job {config.job!r} has no train step: nothing to compile"
        choices = first["accum_choices"] if k_auto else [base.train.accum_steps]
        k, records = smallest_fit(lambda k: compile_step(job_module, _with(base, accum_steps=k), mesh), choices, inf)
        tried += sorted(records.values(), key=lambda r: r["accum_steps"])
        if k is not None:
            fitting[remat] = records[k]
    if not fitting:
        return None, tried, ""
    best = min(fitting.values(), key=lambda r: r["flops_per_chip"])
    why = []
    if k_auto:
        why.append(f"accum_steps={best['accum_steps']}: the smallest of {best['accum_choices']} whose step fits")
    if len(remats) > 1:
        why.append(f"remat={best['remat']}: the fewest FLOPs per step of the fitting policies ("
                   + ", ".join(f"{r} {x['flops_per_chip']:.3g}" for r, x in fitting.items()) + " per chip)")
    return best, tried, "; ".join(why)


# ------------------------------------------------------------------------------------------------
# The plan (compile_for) and a real launch's choice (resolve).
# ------------------------------------------------------------------------------------------------
def _command() -> str:
    """The command line as users type it (`python -m vtp_jax.main ...`), quoted to paste."""
    argv = sys.argv
    if argv and argv[0].endswith(os.path.join("vtp_jax", "main.py")):
        return "python -m vtp_jax.main " + shlex.join(argv[1:])
    return shlex.join(argv)


def plan(job_module, config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Compiles the job for train.compile_for; writes W/compiled.json, prints the table; raises
    DoesNotFit (one line) when no step fits."""
    t = config.train
    devices = topology_devices(t.compile_for, t.compile_slices)
    mesh = runner.make_mesh(config, devices)
    hosts = len({d.process_index for d in devices})
    runner.validate(job_module, config, sharding.batch_size_of(mesh), hosts)
    kind = devices[0].device_kind
    hbm = memory_limit(devices[0])
    limit = hbm * (1 - t.hbm_margin)
    t0 = time.perf_counter()
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # compile-only executables cannot be read back
    try:
        best, tried, why = search(job_module, config, mesh, limit)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    gen, grid = chip_grid(t.compile_for)
    report = dict(command=_command(), topology=t.compile_for, grid=f"{gen}:{'x'.join(map(str, grid))}", slices=t.compile_slices,
                  chips=len(devices), hosts=hosts, device_kind=kind, job=config.job,
                  mesh=dict(mesh.shape), dcn_mesh=list(t.dcn_mesh), hbm_per_chip=hbm, hbm_margin=t.hbm_margin,
                  limit=limit, peak_flops_per_chip=runner.by_kind(runner.PEAK_FLOPS, kind),
                  compile_seconds=time.perf_counter() - t0, step_time="not measured: a bound from FLOPs and peak",
                  tried=tried)
    if not tried:
        report.update(fits=True, nothing_to_compile=why)
    else:
        report.update(fits=best is not None, chosen=best, why=why)
    paths.makedirs(workdir)
    paths.write_text(paths.join(workdir, "compiled.json"), json.dumps(report, indent=1, default=float))
    print(table(report))
    if tried and best is None:
        least = min(tried, key=lambda r: r["memory"]["total"])
        slices = f" x {t.compile_slices} slices" if t.compile_slices > 1 else ""
        hint = "; train.accum_steps=0 searches the k that fits" if config.train.get("accum_steps", 0) else ""
        raise DoesNotFit(
            f"{config.job} does not fit {report['grid']}{slices} ({kind}): the smallest compiled step needs "
            f"{_needs(least)} per chip (accum_steps={least['accum_steps']}, remat="
            f"{least['remat']}), {(least['memory']['total'] - limit) / GiB:.1f} GiB more than the {limit / GiB:.1f} "
            f"usable ({hbm / GiB:.0f} GiB HBM, hbm_margin {t.hbm_margin}); {workdir}/compiled.json has every try"
            f"{hint}")
    return report


def _needs(record: dict) -> str:
    """A step's memory per chip as words: the compiler's total, or the lower bound it refused at."""
    total = f"{record['memory']['total'] / GiB:.2f} GiB"
    return f"at least {total} (temporaries alone: the TPU compiler stopped there)" if "compiler_said" in record else total


def table(r: dict) -> str:
    """The plan as a person reads it."""
    mesh = ", ".join(f"{k} {v}" for k, v in r["mesh"].items())
    lines = [f"compile plan: job {r['job']} on {r['topology']} = {r['grid']} x {r['slices']} slice(s): {r['chips']} "
             f"chips ({r['device_kind']}), {r['hosts']} hosts; mesh ({mesh})"]
    if "nothing_to_compile" in r:
        return "\n".join(lines + [r["nothing_to_compile"]])
    c = r.get("chosen") or min(r["tried"], key=lambda x: x["memory"]["total"])
    m, limit = c["memory"], r["limit"]
    verdict = (f"FITS, {(limit - m['total']) / GiB:.2f} GiB to spare" if m["total"] <= limit
               else f"DOES NOT FIT by {(m['total'] - limit) / GiB:.2f} GiB")
    lines += [f"step: accum_steps {c['accum_steps']}, remat {c['remat']}" + (f"  ({r['why']})" if r.get("why") else ""),
              "per chip                       GiB"]
    lines += [f"  {k:<26}{m[k] / GiB:8.2f}" for k in ("arguments", "temporaries", "outputs", "program") if k in m]
    lines += [f"  {'total':<26}{m['total'] / GiB:8.2f}  of {r['hbm_per_chip'] / GiB:.0f} HBM, {limit / GiB:.2f} usable "
              f"(hbm_margin {r['hbm_margin']}): {verdict}"]
    if "compiler_said" in c:
        lines.append(f"  the TPU compiler refused it: {c['compiler_said']}")
    if c["accum_steps"] > 1 and "loops" in c and c["accum_steps"] not in c["loops"]:
        lines.append(f"  note: the compiler unrolled the {c['accum_steps']}-step accumulation loop, so the micro-batches' "
                     f"activations are live together (on multi-slice, XLA's collective pipeliner does this at "
                     f"k=2); LIBTPU_INIT_ARGS=--xla_tpu_enable_collective_pipeliner=false keeps the loop")
    peak = r["peak_flops_per_chip"]
    lines.append(f"FLOPs per step per chip: {c['flops_per_chip']:.4g} (jaxpr count; XLA's cost analysis "
                 f"{c['xla_flops_per_chip']:.4g}, loop bodies once)")
    if peak:
        t100 = c["flops_per_chip"] / peak
        lines.append(f"step time at the bf16 peak ({peak / 1e12:.0f} TFLOP/s per chip): {t100:.3g} s at 100% MFU, "
                     f"{2 * t100:.3g} s at 50% MFU (a bound from FLOPs: step time is NOT measured)")
    if c["largest_arguments"]:
        lines.append("largest arguments per chip: " + ", ".join(f"{n} {b / GiB:.3g} GiB"
                                                                 for n, b in c["largest_arguments"][:3]))
    lines.append("collectives per step per chip (result bytes, loop trip counts applied):")
    lines += [f"  {k:<20}{v['count']:8d} ops {v['bytes'] / GiB:10.3f} GiB" for k, v in sorted(c["collectives"].items())]
    tries = ", ".join(f"k={x['accum_steps']} remat={x['remat']}: {_needs(x)} ({x['compile_seconds']:.0f} s)"
                      for x in r["tried"])
    lines.append(f"compiled {len(r['tried'])} program(s) in {r['compile_seconds']:.0f} s: {tries}")
    return "\n".join(lines)


def resolve(job_module, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A launch's train.accum_steps = 0 / remat 'auto' chosen by the same search on this machine's
    devices against their memory limit (every process compiles the same candidates and agrees)."""
    mesh = runner.make_mesh(config)
    runner.validate(job_module, config, sharding.batch_size_of(mesh), jax.process_count())
    device = jax.devices()[0]
    limit = memory_limit(device)
    limit = None if limit is None else limit * (1 - config.train.hbm_margin)
    best, tried, why = search(job_module, config, mesh, limit)
    if not tried:
        return config
    if best is None:
        least = min(r["memory"]["total"] for r in tried)
        raise DoesNotFit(f"{config.job}: no accum_steps / remat fits {device.device_kind}: the smallest step needs "
                         f"{least / GiB:.1f} GiB per device of {limit / GiB:.1f} usable")
    logging.info("%s on %d x %s (memory limit %s): %s", config.job, mesh.devices.size, device.device_kind,
                 "unknown" if limit is None else f"{limit / GiB:.1f} GiB usable", why or "as configured")
    return _with(config, accum_steps=best["accum_steps"], remat=best["remat"])
