"""Mesh axis names and the batch-shard helpers that models, objectives and the trainer share.

It sits below all of them so that models/ and objectives/ need nothing from train/: the mesh is
(data, fsdp, tensor) and the batch is split over (data, fsdp). Functions here find the mesh set by
`jax.set_mesh` (the trainer's), so losses and layers pick it up inside jit without threading it.
"""
from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, NamedSharding

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def batch_axes(mesh=None):
    """(mesh, its batch axes among BATCH_AXES); () without a mesh or without such axes.

    The mesh defaults to the one set by `jax.set_mesh`. Axes of size 1 count too: explicitly
    sharded inputs carry them in their types, and the plain (B, B) product of two such inputs is
    rejected."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty:
        return mesh, ()
    return mesh, tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def n_batch_shards(mesh=None, axes=None) -> int:
    """How many pieces the batch is split into (1 without a mesh)."""
    if axes is None:
        mesh, axes = batch_axes(mesh)
    return math.prod(mesh.shape[a] for a in axes) if axes else 1


def over_batch_shards(f, mesh, axes, in_specs, out_specs):
    """`jax.shard_map(f)` over the batch axes. Auto-sharded inputs are resharded by shard_map itself;
    explicitly sharded ones (the default of `jax.make_mesh`) must be resharded first."""
    mapped = jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    kinds = dict(zip(mesh.axis_names, mesh.axis_types))
    if all(kinds[a] != AxisType.Explicit for a in axes):
        return mapped

    def resharded(*args):
        args = [jax.reshard(x, NamedSharding(mesh, s)) for x, s in zip(args, in_specs)]
        return mapped(*args)
    return resharded
