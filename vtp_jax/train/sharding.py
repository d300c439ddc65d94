"""Mesh and logical-axis sharding, declared once.

Parameters carry logical names (embed / mlp / heads / kv / vocab; layers: the depth axis of
scanned block stacks); `LOGICAL_RULES` maps them to the mesh axes (data, fsdp, tensor). The batch
is split over (data, fsdp); parameters and optimizer state over fsdp (ZeRO-3 style) and tensor. A
dimension that a mesh axis does not divide stays replicated on that axis rather than failing.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vtp_jax.axes import BATCH_AXES, MESH_AXES
LOGICAL_RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("norm", None),  # norm scales / biases and LayerScale gammas: small, replicated
    ("layers", None),  # the leading depth axis of scanned block stacks (model.scan_layers)
    # Activations (nn.with_logical_constraint in the blocks).
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_vocab", "tensor"),  # the DINO / iBOT head's prototype logits
)


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
    """(data, fsdp, tensor) mesh; one -1 entry takes the remaining devices."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != 3 or shape.count(-1) > 1:
        raise ValueError(f"mesh must be 3 sizes (data, fsdp, tensor) with at most one -1, got {shape}")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        if devices.size % rest:
            raise ValueError(f"mesh {shape}: {devices.size} devices are not divisible by {rest}")
        shape[shape.index(-1)] = devices.size // rest
    n = int(np.prod(shape))
    if n > devices.size:
        raise ValueError(f"mesh {tuple(shape)} needs {n} devices, {devices.size} are present")
    if n < devices.size:
        logging.warning("mesh %s uses %d of %d devices", tuple(shape), n, devices.size)
    return Mesh(devices.ravel()[:n].reshape(shape), MESH_AXES)


def batch_size_of(mesh: Mesh) -> int:
    """The number of batch shards: every batch dimension must be divisible by it."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def _fit(spec: P, shape, mesh: Mesh) -> P:
    """Drops mesh axes that do not divide their dimension (replicate instead)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axes if names and dim % size == 0 else None)
    return P(*out)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a tree of nn.Partitioned boxes (or ShapeDtypeStructs thereof)."""
    specs = nn.get_partition_spec(boxed_tree)
    shapes = nn.meta.unbox(boxed_tree)

    def one(spec, x):
        mesh_spec = nn.logical_to_mesh_axes(spec, rules) if isinstance(spec, P) else P()
        return NamedSharding(mesh, _fit(mesh_spec, x.shape, mesh))

    return jax.tree.map(one, specs, shapes, is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over (data, fsdp); every batch array is batch-major."""
    return NamedSharding(mesh, P(BATCH_AXES, *(None,) * (ndim - 1)))


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Per-process NumPy batch -> global jax.Arrays sharded over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in local.items()}
