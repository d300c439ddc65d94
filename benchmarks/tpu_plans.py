"""The compile plans' table: what fits where, read from the W/compiled.json of finished plans.

  /usr/bin/time -v python -m vtp_jax.main --config=configs/vtp_l.py --config.train.compile_for=v5p-128 \\
      --config.train.accum_steps=0 --workdir=/tmp/plans/vtp_l_v5p-128 > /tmp/plans/vtp_l_v5p-128.log 2>&1
  python benchmarks/tpu_plans.py /tmp/plans/*/      # the table, into RESULTS.md

Every figure is the TPU compiler's (libtpu on compile-only devices, nothing run): per-chip memory
of the chosen step, its FLOPs (jaxpr count) and the step-time bound at 50% MFU, the collectives'
bytes, and how long the plan took on this machine.
"""
from __future__ import annotations

import argparse
import json
import os

from common import record

GiB = float(1 << 30)


def row(folder: str) -> str:
    with open(os.path.join(folder, "compiled.json")) as f:
        r = json.load(f)
    c = r.get("chosen") or min(r["tried"], key=lambda x: x["memory"]["total"])
    m = c["memory"]
    mesh = "(" + ", ".join(str(v) for v in r["mesh"].values()) + ")"
    comm = sum(v["bytes"] for v in c["collectives"].values()) / GiB
    t50 = 2 * c["flops_per_chip"] / r["peak_flops_per_chip"]
    tries = "; ".join(f"k={x['accum_steps']}: " + (">= " if "compiler_said" in x else "")
                      + f"{x['memory']['total'] / GiB:.2f} GiB" + (" (the compiler refused it)" if "compiler_said" in x else "")
                      for x in r["tried"])
    rss = _peak_rss(folder)
    return (f"`{r['command'].split('vtp_jax.main ', 1)[-1]}`: {r['job']} on {r['topology']} ({r['grid']} x "
            f"{r['slices']}, {r['chips']} chips), mesh {mesh}, accum_steps {c['accum_steps']}, remat {c['remat']}: "
            f"{'FITS' if r['fits'] else 'DOES NOT FIT'}; per chip {m.get('arguments', 0) / GiB:.2f} GiB arguments + "
            f"{m['temporaries'] / GiB:.2f} temporaries + {m.get('outputs', 0) / GiB:.2f} outputs + "
            f"{m.get('program', 0) / GiB:.2f} program = {m['total'] / GiB:.2f} GiB of {r['hbm_per_chip'] / GiB:.0f} "
            f"({r['limit'] / GiB:.2f} usable); {c['flops_per_chip']:.3g} FLOPs per step per chip, >= {t50:.3g} s per "
            f"step at 50% MFU (a bound, not measured); collectives {comm:.2f} GiB per step per chip; compiled in "
            f"{r['compile_seconds'] / 60:.1f} min{rss} (per try: {tries})")


def _peak_rss(folder: str) -> str:
    """The plan's peak host memory, where it ran under `/usr/bin/time -v > FOLDER.log`."""
    try:
        with open(folder.rstrip("/") + ".log") as f:
            kb = next(int(line.split(":")[1]) for line in f if "Maximum resident set size" in line)
    except (OSError, StopIteration, ValueError):
        return ""
    return f", {kb / (1 << 20):.1f} GiB peak host memory"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="workdirs of finished plans (each with compiled.json)")
    parser.add_argument("--note", default="", help="how the machine was used meanwhile (compile times skew when shared)")
    args = parser.parse_args()
    record("The compile plans: TPU compiler, compile-only devices", [row(f) for f in args.folders], args.note)


if __name__ == "__main__":
    main()
