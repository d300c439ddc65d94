"""The compile plans' table: what fits where, read from the W/compiled.json of finished plans.

  python -m vtp_jax.main --config=configs/vtp_l.py --config.train.compile_for=v5p-128 \\
      --config.train.accum_steps=0 --workdir=/tmp/plans/vtp_l_v5p-128          # one plan per row
  python benchmarks/tpu_plans.py /tmp/plans/*                                    # the table, into RESULTS.md

Every figure is the TPU compiler's (libtpu on compile-only devices, nothing run): per-chip memory
of the chosen step, its FLOPs (jaxpr count) and the step-time bound at 50% MFU, the collectives'
bytes, and how long the plan took on this machine.
"""
from __future__ import annotations

import json
import os
import sys

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
    tries = "; ".join(f"k={x['accum_steps']}: {x['memory']['total'] / GiB:.2f}"
                      + (" (refused)" if "compiler_said" in x else "") for x in r["tried"])
    return (f"`{r['command'].split('vtp_jax.main ', 1)[-1]}`: {r['job']} on {r['topology']} ({r['grid']} x "
            f"{r['slices']}, {r['chips']} chips), mesh {mesh}, accum_steps {c['accum_steps']}, remat {c['remat']}: "
            f"{'FITS' if r['fits'] else 'DOES NOT FIT'}; per chip {m.get('arguments', 0) / GiB:.2f} GiB arguments + "
            f"{m['temporaries'] / GiB:.2f} temporaries + {m.get('outputs', 0) / GiB:.2f} outputs + "
            f"{m.get('program', 0) / GiB:.2f} program = {m['total'] / GiB:.2f} GiB of {r['hbm_per_chip'] / GiB:.0f} "
            f"({r['limit'] / GiB:.2f} usable); {c['flops_per_chip']:.3g} FLOPs per step per chip, >= {t50:.3g} s per "
            f"step at 50% MFU (a bound); collectives {comm:.2f} GiB per step per chip; compiled in "
            f"{r['compile_seconds'] / 60:.1f} min (GiB per try: {tries})")


def main():
    record("The compile plans: TPU compiler, compile-only devices", [row(f) for f in sys.argv[1:]])


if __name__ == "__main__":
    main()
