"""Shared by the benchmark scripts: config loading and appending results to RESULTS.md."""
from __future__ import annotations

import datetime
import importlib.util
import os
import platform
import shlex
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def cpu_model() -> str:
    """Ratios against torch move with the CPU (MKL is slower on AMD): every figure names it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine() -> str:
    d = jax.devices()[0]
    return (f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores ({cpu_model()}), {jax.device_count()} x "
            f"{d.device_kind} ({d.platform})")


def record(title: str, lines: list[str], note: str = ""):
    """Prints the lines and appends them as a dated section with the command that made them (and
    `note`: e.g. that the cores were shared, which skews times)."""
    for line in lines:
        print(line)
    cmd = shlex.join(["python", os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    with open(RESULTS, "a") as f:
        f.write(f"\n## {title} ({datetime.date.today()})\n\n`{cmd}`; {machine()}{'; ' + note if note else ''}\n\n")
        f.write("\n".join(f"- {line}" for line in lines) + "\n")
