"""Mesh and logical-axis sharding, declared once.

Parameters carry logical names (embed / mlp / heads / kv / vocab; layers: the depth axis of
scanned block stacks); `LOGICAL_RULES` maps them to the mesh axes (data, fsdp, tensor). The batch
is split over (data, fsdp); parameters and optimizer state over fsdp (ZeRO-3 style) and tensor. A
dimension that a mesh axis does not divide stays replicated on that axis rather than failing.

It sits below models/ and objectives/: the functions that look the batch axes up inside jit find
the mesh set by `jax.set_mesh` (the runner's), so losses and layers pick it up without threading it.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
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


def make_mesh(shape: Sequence[int], devices=None, dcn: Sequence[int] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh laid out on the physical topology: one -1 entry takes the
    remaining devices. `dcn`: how many slices (or hosts, off TPU) each axis spans, for multi-slice
    runs: a hybrid mesh whose slow data-centre-network links carry only the axes `dcn` names
    (usually (slices, 1, 1): data parallel across slices). A mesh that does not fit the devices is
    a ValueError saying why.

    On a TPU slice neighbouring mesh coordinates are neighbouring chips (`mesh_utils`). An axis
    whose size is a product of whole physical axes gets them (fsdp 16 on a 4x4x4 v5p slice: a
    4 x 4 plane, closed rings); one that is not splits a physical axis (fsdp 8 on 4x4x4, or on a
    16x16 v6e / v5e slice: a 4 x 2 or 8 x 1 block of chips): still chip-to-chip links, without the
    wraparound of the split axis. `jax.make_mesh` splits only on v5e and refuses elsewhere."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != 3 or shape.count(-1) > 1:
        raise ValueError(f"mesh must be 3 sizes (data, fsdp, tensor) with at most one -1, got {shape}")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % rest:
            raise ValueError(f"mesh {shape}: {len(devices)} devices are not divisible by {rest}")
        shape[shape.index(-1)] = len(devices) // rest
    n = int(np.prod(shape))
    if n > len(devices):
        raise ValueError(f"mesh {tuple(shape)} needs {n} devices, {len(devices)} are present")
    if n < len(devices):
        logging.warning("mesh %s uses %d of %d devices", tuple(shape), n, len(devices))
    auto = (AxisType.Auto,) * len(MESH_AXES)  # shardings follow the inputs; losses reshard explicitly
    return Mesh(_device_grid(shape, devices[:n], dcn), MESH_AXES, axis_types=auto)


def _device_grid(shape: list[int], devices: list, dcn) -> np.ndarray:
    """`devices` as an array of `shape` (mesh_utils), physical axes split only where needed."""
    hybrid = dcn is not None and any(d != 1 for d in dcn)
    if hybrid:
        dcn = list(dcn)
        if len(dcn) != 3 or any(s % d for s, d in zip(shape, dcn)):
            raise ValueError(f"dcn mesh {tuple(dcn)} must be 3 sizes dividing the mesh {tuple(shape)}")
        ici = [s // d for s, d in zip(shape, dcn)]
        by_process = len({getattr(d, "slice_index", None) for d in devices}) == 1  # off TPU: hosts are the granules
    for split in (False, True):
        try:
            if hybrid:
                return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process,
                                                            allow_split_physical_axes=split)
            return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=split)
        except NotImplementedError as e:  # no assignment to whole physical axes
            if split:
                raise ValueError(str(e).split(".")[0]) from None
            logging.info("mesh %s: an axis is not a product of physical axes; splitting one", tuple(shape))
        except (ValueError, AssertionError) as e:
            what = f"as {tuple(dcn)} slices of {tuple(ici)}" if hybrid else "on these devices"
            raise ValueError(f"mesh {tuple(shape)} {what}: {e}") from None


def meshes_that_fit(devices, dcn: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
    """The (-1, fsdp, 1) meshes (data parallel x FSDP) that `devices` can be laid out as: what an
    error about train.mesh offers instead."""
    devices = list(devices)
    slices = int(np.prod(dcn)) if dcn else 1
    out = []
    for fsdp in range(1, len(devices) // slices + 1):
        if len(devices) % (fsdp * slices):
            continue
        try:
            make_mesh((-1, fsdp, 1), devices, dcn)
        except ValueError:
            continue
        out.append((-1, fsdp, 1))
    return out


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


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (frozen weights, statistics, the step's constants)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over (data, fsdp); every batch array is batch-major."""
    return NamedSharding(mesh, P(BATCH_AXES, *(None,) * (ndim - 1)))


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Per-process NumPy batch -> global jax.Arrays sharded over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in local.items()}


# ------------------------------------------------------------------------------------------------
# Inside jit: the batch axes of the mesh set by `jax.set_mesh`.
# ------------------------------------------------------------------------------------------------
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
