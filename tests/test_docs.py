"""README.md and docs/*.md as a user meets them: the Python floor that setup.py and the README state
is what the installed stack requires; every command runs as written (each `vtp_jax.main` command's
config loads, its overrides apply and its job's validation passes on the machine it names; every
other command of ours parses); released models are named by hub id; every file a command needs
says where it comes from; every figure has a dated source in benchmarks/; docs/code_map.md names
every file."""
import argparse
import ast
import copy
import glob
import importlib.metadata
import math
import os
import re
import runpy
import sys
from decimal import Decimal

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import doc_commands
from doc_commands import ROOT, read

# --- the Python floor ------------------------------------------------------------------------

STACK = ("jax", "jaxlib", "flax", "grain", "orbax-checkpoint", "array-record", "optax", "numpy", "tensorflow-datasets")


def _setup():
    """setup.py's python_requires and its requirement lists (CORE, TRAIN, HUB, ...), read as data."""
    tree = ast.parse(read(os.path.join(ROOT, "setup.py")))
    names = {}  # the module-level constants (JAX = "...", CORE = [f"jax=={JAX}", ...]), evaluated in order
    for node in tree.body:
        if isinstance(node, ast.Assign):
            exec(compile(ast.Module([node], []), "setup.py", "exec"), names)
    lists = {k: v for k, v in names.items() if isinstance(v, list)}
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == "python_requires")), lists


def _floor(spec: str) -> Version | None:
    """The lowest Python a Requires-Python admits (its >= / > / ~= / == bound), None if unbounded."""
    bounds = [Version(s.version.rstrip(".*")) for s in SpecifierSet(spec) if s.operator in (">=", ">", "~=", "==")]
    return max(bounds) if bounds else None


def _closure(requirements):
    """Every installed distribution the requirements pull in, with the markers of this machine."""
    found, todo = {}, [(Requirement(r), {""}) for r in requirements]
    while todo:
        req, extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in found:
            continue
        try:
            found[name] = dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} (required through setup.py) is not installed: pip install -e '.[test]'")
        todo += [(Requirement(r), set(req.extras) or {""}) for r in dist.requires or []]
    return found


def test_python_floor_is_what_the_installed_stack_requires():
    python_requires, lists = _setup()
    ours = _floor(python_requires)
    stack = _closure(lists["CORE"] + lists["TRAIN"] + lists["HUB"])
    assert set(STACK) <= set(stack), sorted(set(STACK) - set(stack))
    floors = {name: (d.metadata["Requires-Python"], _floor(d.metadata["Requires-Python"] or ""))
              for name, d in stack.items()}
    stricter = {n: spec for n, (spec, f) in floors.items() if spec and not SpecifierSet(spec).contains(ours)}
    assert not stricter, f"setup.py says python_requires={python_requires!r}, but these need more: {stricter}"
    highest = max(f for _, f in floors.values() if f)
    assert (ours.major, ours.minor) == (highest.major, highest.minor), (
        f"setup.py's floor {ours} is above what the stack needs ({highest}): say what it needs")
    readme = read(os.path.join(ROOT, "README.md"))
    assert re.findall(r"Python >= (3\.\d+)", readme) == [f"{ours.major}.{ours.minor}"]
    sbatch = read(os.path.join(ROOT, "launch", "gpu_slurm.sbatch"))
    assert f"sys.version_info >= ({ours.major}, {ours.minor})" in sbatch
    assert re.search(rf'PYTHON="\$\{{PYTHON:-{ours.major}\.{ours.minor}\}}"', read(os.path.join(ROOT, "launch", "tpu_pod.sh")))


# --- every command as written ----------------------------------------------------------------

FILE_SUFFIXES = (".msgpack", ".npz", ".pt", ".pth", ".safetensors", ".json", ".array_record", ".tar", ".jsonl", ".tsv")
OURS = re.compile(r"(python -m vtp_jax\.|python (docs|benchmarks|tests)/|launch/|sbatch .*launch/)")
NEEDS = {"create": ("ACCELERATOR",), "setup": ("REPO",), "run": ("WORKDIR", "ACCELERATOR"), "plan": ("ACCELERATOR",)}


def _ours():
    out = []
    for where, argv, env in doc_commands.commands():
        if OURS.match(" ".join(argv)):
            out.append(pytest.param(argv, env if "`" not in where else None, id=where))
    return out


def _main_flags(args):
    """vtp_jax.main's flags parsed from `args` as `python -m vtp_jax.main` parses them."""
    from absl import flags
    from ml_collections import config_flags

    from vtp_jax import main

    argv = ["vtp_jax.main", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    for flag in flags.FLAGS.get_flags_for_module(main.__name__):
        if flag.name != "config":
            flags.DEFINE_flag(copy.deepcopy(flag), flag_values=fv)
    fv(argv)
    return fv


def _validate(args, devices, processes, monkeypatch):
    """Config, overrides and the job's validation, on `devices` (None: the fewest the mesh takes).
    Files the command names are taken as present (the user brings them: test_files_... says
    from where); every other file is looked up for real."""
    from vtp_jax import jobs, paths

    fv = _main_flags(args)
    assert fv.workdir, "no --workdir"
    config = fv.config
    t = config.get("train", {})
    mesh, dcn = list(t.get("mesh", (-1, 1, 1))), list(t.get("dcn_mesh", (1, 1, 1)))
    topology = t.get("compile_for", "")
    if topology:
        devices = doc_commands.chips(topology) * t.get("compile_slices", 1)
    if devices is None:
        devices = math.prod(s for s in mesh if s != -1) * (dcn[mesh.index(-1)] if -1 in mesh else 1)
    if -1 in mesh:
        rest = math.prod(s for s in mesh if s != -1)
        assert devices % rest == 0, f"train.mesh={tuple(mesh)} does not divide {devices} devices"
        mesh[mesh.index(-1)] = devices // rest
    assert math.prod(mesh) == devices, f"train.mesh={tuple(mesh)} on {devices} devices"
    named = [v.rstrip("/") for w in args if w.startswith("--") and "=" in w for v in [w.split("=", 1)[1]] if v]

    def brought(path, want):  # a path the command names (or one inside it): a file if its name has a suffix
        path = str(path)
        if not any(path == v or path.startswith(v + "/") for v in named):
            return None
        is_file = os.path.splitext(os.path.basename(path))[1] in FILE_SUFFIXES
        return {"exists": True, "isfile": is_file, "isdir": not is_file}[want]

    for name in ("exists", "isfile", "isdir"):
        real = getattr(paths, name)
        monkeypatch.setattr(paths, name, lambda p, name=name, real=real: (
            real(p) if brought(p, name) is None else brought(p, name)))
    jobs.validate(config, mesh[0] * mesh[1], processes)


class _Parsed(Exception):
    pass


def _parse_only(argv, monkeypatch):
    """Runs a script or module of ours up to its argparse parse: its arguments as written parse."""
    parse = argparse.ArgumentParser.parse_args

    def parsed(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parsed)
    if argv[1] == "-m":
        monkeypatch.setattr(sys, "argv", [argv[2], *argv[3:]])
        run = lambda: runpy.run_module(argv[2], run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        script = os.path.join(ROOT, argv[1])
        assert os.path.isfile(script), f"{argv[1]} does not exist"
        monkeypatch.setattr(sys, "argv", [script, *argv[2:]])
        monkeypatch.syspath_prepend(os.path.dirname(script))
        run = lambda: runpy.run_path(script, run_name="__main__")  # noqa: E731
    with pytest.raises(_Parsed):
        run()


@pytest.mark.parametrize("argv,env", _ours())
def test_every_command_in_the_docs_runs_as_written(argv, env, monkeypatch):
    monkeypatch.chdir(ROOT)
    if argv[0] == "launch/tpu_pod.sh":
        script = read(os.path.join(ROOT, argv[0]))
        assert re.search(rf"^  {argv[1]}\)", script, re.M), f"tpu_pod.sh has no command {argv[1]!r}"
        if env is None:  # named in prose (`launch/tpu_pod.sh wait`): the command exists, its block is elsewhere
            return
        missing = [v for v in ("TPU_NAME", "ZONE", *NEEDS.get(argv[1], ())) if v not in env]
        assert not missing, f"launch/tpu_pod.sh {argv[1]} needs {missing}, which the docs' block does not set"
        if argv[1] in ("run", "plan"):
            chips = doc_commands.chips(env["ACCELERATOR"].replace("v5litepod", "v5e")) * int(env.get("SLICES", 1))
            _validate([*argv[2:], "--workdir=" + env["WORKDIR"]], chips, max(1, chips // 4), monkeypatch)
    elif argv[0] == "sbatch":
        i = argv.index("launch/gpu_slurm.sbatch")
        nodes = int(next((w.split("=")[1] for w in argv[1:i] if w.startswith("--nodes=")), 1))
        _validate(argv[i + 1:], 8 * nodes, 8 * nodes, monkeypatch)  # the sbatch file: 8 tasks of 1 GPU per node
    elif argv[0] == "launch/local_multiprocess.sh":
        n = int(argv[1])
        _validate(argv[2:], 2 * n, n, monkeypatch)  # DEVICES_PER_PROCESS defaults to 2
    elif argv[1:3] == ["-m", "vtp_jax.main"]:
        _validate(argv[3:], None, 1, monkeypatch)
    else:
        _parse_only(argv, monkeypatch)


def test_the_commands_include_the_ones_users_start_with():
    flat = [" ".join(p.values[0]) for p in _ours()]
    for expected in ("python -m vtp_jax.main --config=configs/demo.py --workdir=/tmp/vtp_demo",
                     "launch/tpu_pod.sh run --config=configs/vtp_l.py", "--config.train.compile_for=v5p-128",
                     "--config.train.dcn_mesh=(4,1,1)", "sbatch --nodes=4 launch/gpu_slurm.sbatch",
                     "python docs/make_figures.py --demo", "--config=configs/sample.py:demo"):
        assert any(expected in f for f in flat), expected
    assert len(flat) >= 35, len(flat)


def test_the_laptop_sample_command_divides_the_demo_classes():
    from vtp_jax.data import procedural

    (argv,) = [p.values[0] for p in _ours() if "--config=configs/sample.py:demo" in p.values[0]]
    config = _main_flags(argv[3:]).config
    assert config.sample.num_samples % len(procedural.CLASS_NAMES) == 0
    assert config.sample.part_size % config.sample.batch_size == 0


# --- names and files -------------------------------------------------------------------------

BARE_RELEASE = re.compile(r"(?<![\w/.-])VTP-(Small|Base|Large)-f16d64")


def test_released_models_are_named_by_hub_id_everywhere():
    files = doc_commands.doc_files() + sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
    files += sorted(glob.glob(os.path.join(ROOT, "vtp_jax", "**", "*.py"), recursive=True))
    bare = [f"{os.path.relpath(f, ROOT)}:{read(f)[:m.start()].count(chr(10)) + 1}" for f in files
            for m in BARE_RELEASE.finditer(read(f))]
    assert not bare, f"a bare release name is no hub id (MiniMaxAI/VTP-...-f16d64): {bare}"


FILES = re.compile(r"[^=/\s]+\.(msgpack|npz|pt|pth|safetensors)$")


def _sourced_files():
    """File names in the first column of a "Where ... come from" table of the docs."""
    names = set()
    for path in doc_commands.doc_files():
        for section in re.split(r"^#+ ", read(path), flags=re.M):
            if re.match(r"Where .* come from", section):
                for row in re.findall(r"^\| (.*?) \|", section, re.M):
                    names.update(os.path.basename(n) for n in re.findall(r"`([^`]+)`", row))
    return names


def test_every_file_a_command_needs_says_where_it_comes_from():
    sourced = _sourced_files()
    needed = {os.path.basename(v) for _, argv, _ in doc_commands.commands() for w in argv
              for v in [w.split("=", 1)[-1]] if FILES.search(v) and not v.startswith("S/")}
    assert {"lpips_vgg16.msgpack", "inception.msgpack", "latents_stats.pt", "VIRTUAL_imagenet256_labeled.npz"} <= needed
    assert not needed - sourced, f"no 'Where ... come from' table names {sorted(needed - sourced)}"


# --- figures ---------------------------------------------------------------------------------

UNITS = {"%": "%", "x": "x", "times": "x", "s": "s", "seconds": "s", "ms": "ms", "min": "min", "minutes": "min",
         "h": "h", "hour": "h", "hours": "h", "GiB": "GiB", "GB": "GB", "MB": "MB", "dB": "dB", "img/s": "img/s",
         "images/s": "img/s", "records/s": "records/s", "steps/s": "steps/s", "GFLOP": "GFLOP", "GFLOP/s": "GFLOP/s",
         "TFLOP/s": "TFLOP/s", "points": "points"}
FIGURE = re.compile(r"(?<![\w.\-/:#^|])(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)(?:(x)(?![\w/])|\s?("
                    + "|".join(sorted((re.escape(u) for u in UNITS if u != "x"), key=len, reverse=True))
                    + r")(?![\w/])|(?![\w/:]|\.\d))")
# Figures derived from sourced ones (each with its derivation), the only figures not found verbatim.
DERIVED = {
    "11.7 points": "study.csv gen_accuracy, VTP 4x - VTP 1x: 0.4492 - 0.3320",
    "7 x": "study.md lds, VTP / AE: 0.01814 / 0.0027 = 6.7 at 1x, 0.05589 / 0.01089 = 5.1 at 4x",
}


def _numbers_of(text):
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 4,500
    return re.sub(r"(?<=\d) (?=\d{3}\b)", "", text)  # 4 500 (RESULTS.md's thin spaces)


def _figures(text):
    """(number, unit) of every figure in a doc's prose: a number with a unit, or with a decimal
    point. Code, links, dates and arXiv ids are not figures; bare integers are counts and settings."""
    text = doc_commands.prose(text)
    for pattern in (r"`[^`\n]*`", r"\]\([^)]*\)", r"https?://\S+", r"\b\d{4}-\d{2}-\d{2}\b", r"arXiv \d+\.\d+",
                    r"\b(Python|Ubuntu|jax|CUDA)\s+(>=\s+)?\d+(\.\d+)*"):  # versions are not figures
        text = re.sub(pattern, " ", text)
    out = []
    for m in FIGURE.finditer(_numbers_of(text)):
        unit = UNITS.get(m.group(2) or m.group(3))
        if unit or re.search(r"[.e]", m.group(1)):
            out.append((m.group(1), unit))
    return out


def _sources():
    """unit -> numbers of benchmarks/RESULTS.md and benchmarks/study/ (fractions there also as
    percentages / points: the study's tables hold 0.332 for 33.2%)."""
    by_unit = {}
    texts = [read(os.path.join(ROOT, "benchmarks", "RESULTS.md"))]
    texts += [read(p) for p in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "study", "*.md")))]
    for t in texts:
        for m in FIGURE.finditer(_numbers_of(t)):
            for unit in {None, UNITS.get(m.group(2) or m.group(3))}:
                by_unit.setdefault(unit, set()).add(m.group(1))
    studies = texts[1:] + [read(p) for p in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "study", "*.csv")))]
    for value in re.findall(r"[-+]?\d*\.\d+(?:e[-+]?\d+)?", "\n".join(studies)):
        by_unit.setdefault(None, set()).add(value)
        if 0.01 <= abs(float(value)) <= 1:  # a fraction as a percentage (or percentage points) >= 1
            for unit in ("%", "points", None):
                by_unit.setdefault(unit, set()).add(str(Decimal(value) * 100))
    by_unit["x"] = by_unit["x"] | by_unit[None]  # ratios: RESULTS.md writes them bare
    return by_unit


def _agrees(figure: str, source: str) -> bool:
    """The figure is the source rounded to the figure's last digit."""
    a, b = Decimal(figure), Decimal(source)
    return a == b or abs(b - a) <= Decimal(5).scaleb(a.as_tuple().exponent - 1)


def _code_values():
    """Settings written in configs/ and vtp_jax/ (a figure without a unit may be one of them)."""
    text = "\n".join(read(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                     + glob.glob(os.path.join(ROOT, "vtp_jax", "**", "*.py"), recursive=True))
    return {Decimal(v) for v in re.findall(r"(?<![\w.])\d+\.\d+(?:e[-+]?\d+)?|(?<![\w.])\d+e-\d+", text.replace("_", ""))}


def test_every_figure_in_the_docs_has_a_dated_source():
    sources, settings = _sources(), _code_values()
    unsourced = []
    for path in doc_commands.doc_files():
        for number, unit in _figures(read(path)):
            label = f"{number} {unit}" if unit else number
            if label in DERIVED or any(_agrees(number, s) for s in sources.get(unit, ())):
                continue
            if unit is None and Decimal(number) in settings:
                continue
            unsourced.append(f"{os.path.relpath(path, ROOT)}: {label}")
    assert not unsourced, ("figures with no source in benchmarks/RESULTS.md or benchmarks/study/ (measure and "
                           f"record them, or remove them): {unsourced}")


def test_the_figure_check_catches_an_unsourced_figure():
    sources = _sources()
    assert _figures("compiles in 125 s, needs 1.85 GiB; shape 16 x 16 x 64; seeds 0.05 to 0.4 points") == [
        ("125", "s"), ("1.85", "GiB"), ("0.05", None), ("0.4", "points")]
    assert not any(_agrees("1.85", s) for s in sources["GiB"])
    assert not any(_agrees("0.4", s) for s in sources["points"])
    assert any(_agrees("22.4", s) for s in sources["dB"]) and any(_agrees("33.2", s) for s in sources["%"])


# --- the code map ----------------------------------------------------------------------------

def test_the_code_map_names_every_file():
    code_map = read(os.path.join(ROOT, "docs", "code_map.md"))
    training = read(os.path.join(ROOT, "docs", "training.md"))
    files = [p for p in glob.glob(os.path.join(ROOT, "vtp_jax", "**", "*.py"), recursive=True)
             if not p.endswith("__init__.py")]
    files += glob.glob(os.path.join(ROOT, "benchmarks", "*.py")) + glob.glob(os.path.join(ROOT, "launch", "*"))
    missing = [os.path.relpath(p, ROOT) for p in files if os.path.basename(p) not in code_map]
    missing += [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))
                if re.search(rf"\b{os.path.basename(p)[:-3]}\b", code_map) is None]
    missing += [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                if f"`configs/{os.path.basename(p)}" not in training]
    assert not missing, f"docs/code_map.md (configs: docs/training.md's table) does not name {sorted(missing)}"
