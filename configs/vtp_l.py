"""VTP-L (f16d64) with the paper's recipe: the documented entry for `configs/vtp.py:L`.

  python -m vtp_jax.main --config=configs/vtp_l.py --workdir=gs://bucket/vtp_l \\
    --config.data.paths='gs://bucket/datacomp/*.array_record' --config.objectives.lpips_params=...

Every field, its reason and the other sizes and ablations are in configs/vtp.py.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("vtp", os.path.join(os.path.dirname(__file__), "vtp.py"))
_vtp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_vtp)


def get_config():
    return _vtp.get_config("L")
