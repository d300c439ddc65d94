"""Checksums of a checkpoint's arrays, written with each step and verified on restore.

orbax checks no array content (its crc32c covers only the shard index), so a flipped byte reads
back silently. The sums here are computed on device from the arrays being saved, exact integer
arithmetic, so they do not depend on the sharding, the number of processes or the reduction order.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

INTEGRITY = "integrity"  # the orbax item holding checksums and the divergence guard's loss history


def _key_name(k) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_names(tree) -> list[str]:
    """Dotted paths of the leaves, as orbax names them ('opt_state.inner_state.1.mu.trunk...')."""
    return [".".join(_key_name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _words(x):
    """The bits of x as uint32 words (PRNG keys by their key data; 64-bit dtypes as 2 words)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_checksum(x):
    """Two position-weighted sums of the words mod 2^32. The first weighs word i by 2i + 1: an odd
    weight, so any change of any one word changes it; the second, with index-dependent bit masks,
    catches most of what cancels in the first. Integer sums are exact, so neither depends on the
    sharding or the reduction order."""
    w = _words(x)
    idx, stride = jnp.zeros(w.shape, jnp.uint32), 1
    for d in reversed(range(w.ndim)):  # the flat index without a (resharding) reshape
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2 ** 32)
        stride *= w.shape[d]
    a = jnp.sum(w * (2 * idx + 1), dtype=jnp.uint32)
    b = jnp.sum((w ^ (idx * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B), dtype=jnp.uint32)
    return jnp.stack([a, b])


_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def checksums(state) -> dict[str, list[int]]:
    """{leaf name: [sum, mixed sum]} of every array of `state`, the same on every process."""
    sums = jax.tree.leaves(_checksums(state))
    return {name: [int(v) for v in np.asarray(s.addressable_data(0))] for name, s in zip(leaf_names(state), sums)}


def verify(state, stored: dict) -> str | None:
    """None if `state` has the checksums `stored` (an `integrity` item) records, else the problem."""
    want, got = stored.get("checksums", {}), checksums(state)
    bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    if not bad:
        return None
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return f"checksum mismatch in {len(bad)} of {len(want)} arrays ({', '.join(bad[:3])}{more})"


def verify_step(step_dir, state) -> str | None:
    """`verify` against the integrity item saved in a step folder (W/checkpoints/<step>), for
    readers outside the runner (the eval job, stage 2's init_from); None too for a step saved
    before checksums existed."""
    path = epath.Path(step_dir) / INTEGRITY / "metadata"
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"its checksums cannot be read ({str(e).splitlines()[0][:240] if str(e) else type(e).__name__})"
    return verify(state, stored)
