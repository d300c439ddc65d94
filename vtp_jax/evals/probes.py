"""Frozen-feature probes: DINOv2's linear probe (a sweep of learning rates) and DINO's weighted kNN.

Features come in as (N, D) arrays with integer labels; label -1 marks a padding row, which never
trains, votes or counts. Each probe is one compiled program. On a mesh whose batch axes (data,
fsdp) split the train rows, each device keeps only its share of the train set: the linear probe
assembles each minibatch from the devices that hold its rows (an exact psum of one owner and
zeros), the kNN takes each device's local top-k and merges them, so results equal the
single-device ones. The val rows are replicated: the work that grows with them is split over the
train rows instead.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vtp_jax.data import eval_splits
from vtp_jax.evals.zero_shot import topk_correct
from vtp_jax.models.vtp import VTP
from vtp_jax.sharding import batch_axes, n_batch_shards, over_batch_shards

__all__ = ["DINOV2_LRS", "linear_probe", "knn"]

# DINOv2 eval/linear.py's sweep; like its scale_lr, each is multiplied by batch_size / 256.
DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
_HI = jax.lax.Precision.HIGHEST
_KS = (1, 5)


def _mesh_and_axes(train_x, mesh):
    """The mesh whose batch axes split the train rows: `mesh`, else the `jax.set_mesh` context,
    else the mesh that train_x is already placed on."""
    mesh, axes = batch_axes(mesh)
    if not axes and isinstance(getattr(train_x, "sharding", None), NamedSharding):
        mesh, axes = batch_axes(train_x.sharding.mesh)
    return mesh, axes


def _check(name, train_x, train_y, val_x, val_y, mesh, axes):
    if (train_x.ndim != 2 or val_x.ndim != 2 or train_x.shape[1] != val_x.shape[1]
            or train_y.shape != train_x.shape[:1] or val_y.shape != val_x.shape[:1]):
        raise ValueError(f"{name} needs train_x (N, D), train_y (N,), val_x (M, D), val_y (M,), got "
                         f"{train_x.shape}, {train_y.shape}, {val_x.shape}, {val_y.shape}")
    if not (jnp.issubdtype(train_y.dtype, jnp.integer) and jnp.issubdtype(val_y.dtype, jnp.integer)):
        raise ValueError(f"{name}: labels must be integers (-1 for padding rows), got "
                         f"{train_y.dtype} and {val_y.dtype}")
    if axes and train_x.shape[0] % n_batch_shards(mesh, axes):
        raise ValueError(f"{name}: {train_x.shape[0]} train rows are not divisible by the "
                         f"{n_batch_shards(mesh, axes)} batch shards of the mesh axes {axes}; pad "
                         "them with label -1")


def _sharded_over_train_rows(local, mesh, axes):
    """`local(train_x, train_y, val_x, val_y, *rest)` on each device's train rows; all else replicated."""
    if not axes:
        return local
    rows = P(axes)

    def run(train_x, train_y, val_x, val_y, *rest):
        specs = (rows, rows, P(), P()) + (P(),) * len(rest)
        return over_batch_shards(local, mesh, axes, specs, P())(train_x, train_y, val_x, val_y, *rest)
    return run


def _pad_rows(x, multiple, value):
    pad = -x.shape[0] % multiple
    return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1), constant_values=value)


def _chunks(val_x, val_y, size):
    """(n, size, D), (n, size): val rows in chunks, the last one padded with label -1 rows."""
    x, y = _pad_rows(val_x, size, 0), _pad_rows(val_y, size, -1)
    return x.reshape(-1, size, x.shape[1]), y.reshape(-1, size)


def _global_rows(local, idx, axes):
    """Rows `idx` (global indices, the same on every device) of an array split by rows over `axes`:
    each device gives the rows it holds and zeros for the others, so the sum is exact."""
    if not axes:
        return jnp.take(local, idx, axis=0)
    n = local.shape[0]
    offset = jax.lax.axis_index(axes) * n
    own = (idx >= offset) & (idx < offset + n)
    rows = jnp.take(local, jnp.clip(idx - offset, 0, n - 1), axis=0)
    return jax.lax.psum(jnp.where(own.reshape(own.shape + (1,) * (rows.ndim - 1)), rows, 0), axes)


def _gather_shards(x, axes):
    """(devices, ...) stack of every device's `x`, the same on all: each device places its block
    among zeros and a psum adds them, which is exact and, unlike all_gather, typed replicated."""
    placed = jnp.zeros((jax.lax.axis_size(axes),) + x.shape, x.dtype).at[jax.lax.axis_index(axes)].set(x)
    return jax.lax.psum(placed, axes)


def _head_logits(params, x):
    """(L, B, C): every learning rate's head on the same inputs, one wide matmul."""
    return jnp.einsum("bd,ldc->lbc", x, params["kernel"], precision=_HI) + params["bias"][:, None]


def _linear_probe_local(train_x, train_y, val_x, val_y, seed, *, axes, n_train, num_classes, lrs, epochs,
                        batch_size, momentum, weight_decay):
    train_x, val_x = train_x.astype(jnp.float32), val_x.astype(jnp.float32)
    steps = n_train // batch_size
    # Heads start at zero (DINOv2 draws N(0, 0.01^2) weights; softmax regression is convex, so
    # that is immaterial) and the seed only orders the minibatches. One unit-peak cosine schedule
    # (CosineAnnealingLR to 0, per iteration) serves all heads: SGD's momentum buffer does not
    # depend on the lr, so scaling the updates by each head's lr is exactly one SGD run per lr.
    params = {"kernel": jnp.zeros((len(lrs), train_x.shape[1], num_classes)),
              "bias": jnp.zeros((len(lrs), num_classes))}
    tx = optax.sgd(optax.cosine_decay_schedule(1.0, epochs * steps), momentum=momentum)
    if weight_decay:  # torch SGD: the decay joins the gradient before the momentum
        tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
    head_lr = jnp.asarray(lrs, jnp.float32) * (batch_size / 256)

    def loss(params, x, y):
        """Sum over heads of each head's mean cross-entropy over the minibatch's real rows."""
        logits = _head_logits(params, x)
        labels = jnp.broadcast_to(jnp.maximum(y, 0), logits.shape[:2])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        weight = (y >= 0) / jnp.maximum(jnp.sum(y >= 0), 1)
        return jnp.sum(ce * weight)

    def step(i, carry, perm):
        params, opt_state = carry
        idx = jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)
        grads = jax.grad(loss)(params, _global_rows(train_x, idx, axes), _global_rows(train_y, idx, axes))
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: u * head_lr.reshape((-1,) + (1,) * (u.ndim - 1)), updates)
        return optax.apply_updates(params, updates), opt_state

    def epoch(e, carry):
        perm = jax.random.permutation(jax.random.fold_in(jax.random.key(seed), e), n_train)
        return jax.lax.fori_loop(0, steps, functools.partial(step, perm=perm), carry)

    params, _ = jax.lax.fori_loop(0, epochs, epoch, (params, tx.init(params)))

    def score(total, chunk):
        x, y = chunk
        return total + jax.vmap(lambda logits: topk_correct(logits, y, y >= 0, _KS))(_head_logits(params, x)), None

    counts, _ = jax.lax.scan(score, jnp.zeros((len(lrs), len(_KS)), jnp.int32), _chunks(val_x, val_y, batch_size))
    return counts


@functools.partial(jax.jit, static_argnames=("mesh", "axes", "num_classes", "lrs", "epochs", "batch_size",
                                             "momentum", "weight_decay"))
def _linear_probe_counts(train_x, train_y, val_x, val_y, seed, *, mesh, axes, **hparams):
    local = functools.partial(_linear_probe_local, axes=axes, n_train=train_x.shape[0], **hparams)
    return _sharded_over_train_rows(local, mesh, axes)(train_x, train_y, val_x, val_y, seed)


def linear_probe(train_x, train_y, val_x, val_y, num_classes, *, lrs=DINOV2_LRS, epochs=10, batch_size=128,
                 momentum=0.9, weight_decay=0.0, seed=0, mesh=None) -> dict:
    """DINOv2's linear evaluation on precomputed features: one linear head per learning rate, all
    trained at once (a stacked (L, D, C) head) in one jitted loop, the best head on val reported.

    SGD with `momentum` (0.9) and `weight_decay` (0, as DINOv2), cosine decay to 0 over `epochs`
    passes of minibatches of `batch_size` rows (global; the last partial minibatch of each seeded
    permutation is dropped), lr = each of `lrs` x batch_size / 256. Features are NOT standardized,
    as in DINOv2: the probe scores the features as the model gives them, and the 4-decade lr sweep
    absorbs their scale.

    Train rows may be split over the batch axes of `mesh` (else the `jax.set_mesh` context, else
    train_x's own mesh); their number must be divisible by those axes' size (pad with label -1).
    Returns {'top1', 'top5'} of the best head by val top-1 (the smallest such lr on ties), as
    fractions of the real val rows, its 'lr' and 'top1_per_lr'.
    """
    mesh, axes = _mesh_and_axes(train_x, mesh)
    _check("linear_probe", train_x, train_y, val_x, val_y, mesh, axes)
    if train_x.shape[0] < batch_size:
        raise ValueError(f"linear_probe: {train_x.shape[0]} train rows are fewer than one minibatch "
                         f"of batch_size={batch_size}")
    lrs = tuple(float(lr) for lr in lrs)
    counts = _linear_probe_counts(train_x, train_y, val_x, val_y, jnp.int32(seed), mesh=mesh, axes=axes,
                                  num_classes=num_classes, lrs=lrs, epochs=epochs, batch_size=batch_size,
                                  momentum=float(momentum), weight_decay=float(weight_decay))
    acc = np.asarray(counts) / max(int(jnp.sum(val_y >= 0)), 1)
    best = int(np.argmax(acc[:, 0]))
    return {"top1": float(acc[best, 0]), "top5": float(acc[best, 1]), "lr": lrs[best],
            "top1_per_lr": dict(zip(lrs, acc[:, 0].tolist()))}


def _l2_normalize(x):
    """torch F.normalize: x / max(|x|, 1e-12), so all-zero padding rows stay finite."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _knn_local(train_x, train_y, val_x, val_y, *, axes, num_classes, k, temperature, batch_size):
    train = _l2_normalize(train_x)
    local_k = min(k, train.shape[0])

    def chunk_counts(total, chunk):
        x, y = chunk
        sim = jnp.matmul(_l2_normalize(x), train.T, precision=_HI)
        sim = jnp.where(train_y[None] >= 0, sim, -jnp.inf)  # padding rows are never neighbours
        sims, idx = jax.lax.top_k(sim, local_k)
        labels = train_y[idx]
        if axes:  # the global top-k is among the devices' local top-k's, in device (= row) order
            sims, labels = (jnp.concatenate(_gather_shards(v, axes), axis=1) for v in (sims, labels))
            sims, pos = jax.lax.top_k(sims, min(k, sims.shape[1]))
            labels = jnp.take_along_axis(labels, pos, axis=1)
        # DINOv2 normalizes the exp(sim / T) weights over the k neighbours (a softmax): the same
        # ranking as DINO's raw exp(sim / T), without overflow at small T.
        weights = jax.nn.softmax(sims / temperature, axis=1)
        votes = jnp.einsum("bk,bkc->bc", weights, jax.nn.one_hot(labels, num_classes), precision=_HI)
        return total + topk_correct(votes, y, y >= 0, _KS), None

    counts, _ = jax.lax.scan(chunk_counts, jnp.zeros(len(_KS), jnp.int32), _chunks(val_x, val_y, batch_size))
    return counts


@functools.partial(jax.jit, static_argnames=("mesh", "axes", "num_classes", "k", "temperature", "batch_size"))
def _knn_counts(train_x, train_y, val_x, val_y, *, mesh, axes, **hparams):
    local = functools.partial(_knn_local, axes=axes, **hparams)
    return _sharded_over_train_rows(local, mesh, axes)(train_x, train_y, val_x, val_y)


def knn(train_x, train_y, val_x, val_y, num_classes, k=20, temperature=0.07, batch_size=256, *, mesh=None) -> dict:
    """DINO's weighted k-NN classifier: {'top1', 'top5'} as fractions of the real val rows.

    Features are L2-normalized; each val row's k most cosine-similar train rows vote for their
    labels with weight exp(sim / T), summed per class. Val rows go in chunks of `batch_size`, so
    memory is O(batch_size x N_train / devices). Train rows may be split over the batch axes of
    `mesh` (else the `jax.set_mesh` context, else train_x's own mesh), their number divisible by
    those axes' size.
    """
    mesh, axes = _mesh_and_axes(train_x, mesh)
    _check("knn", train_x, train_y, val_x, val_y, mesh, axes)
    counts = _knn_counts(train_x, train_y, val_x, val_y, mesh=mesh, axes=axes, num_classes=num_classes, k=k,
                         temperature=float(temperature), batch_size=batch_size)
    acc = np.asarray(counts) / max(int(jnp.sum(val_y >= 0)), 1)
    return {"top1": float(acc[0]), "top5": float(acc[1])}


# ------------------------------------------------------------------------------------------------
# The evaluators: frozen features of a tokenizer on a train and a val split.
# ------------------------------------------------------------------------------------------------
# Feature sets (the paper's scaling figures probe the bottleneck; its Table 2 DINOv2-style trunk
# features: the cls of the last 1 or 4 blocks and the mean patch token of the last).
FEATURES = ("latent_pooled", "latent_flat", "cls", "cls_patch", "cls4_patch")


def _feature_fn(model, names):
    depth = model.config.depth
    layers = tuple(range(max(depth - 4, 0), depth)) if "cls4_patch" in names else ()

    def features(params, images):
        f = model.apply({"params": params}, images, return_layers=layers, method=VTP.encode_features)
        mean_patch = f["patches"].mean(axis=(1, 2))
        out = {}
        if {"latent_pooled", "latent_flat"} & set(names):
            z = model.apply({"params": params}, f["patches"], method=VTP.bottleneck)
            out["latent_pooled"] = z.mean(axis=(1, 2))
            out["latent_flat"] = z.reshape(z.shape[0], -1)
        out["cls"] = f["cls"]
        out["cls_patch"] = jnp.concatenate([f["cls"], mean_patch], axis=-1)
        if layers:
            out["cls4_patch"] = jnp.concatenate([*f["intermediate_cls"], mean_patch], axis=-1)
        return {k: out[k].astype(jnp.float32) for k in names}

    return jax.jit(features)


class _Probe:
    """Shared by the linear probe and kNN: feature sets of the train and val splits, on host."""

    @staticmethod
    def defaults():
        import ml_collections

        c = ml_collections.ConfigDict()
        c.features = ("latent_pooled",)  # any of FEATURES; `top1` is the first set's (kNN) or the best (probe)
        c.num_classes = 0  # 0: 1 + the largest train label
        return c

    def __init__(self, model, mesh, e):
        bad = [f for f in e.features if f not in FEATURES]
        if bad:
            raise ValueError(f"{type(self).__name__}: unknown features {bad}; expected some of {FEATURES}")
        self.e, self.mesh, self.model = e, mesh, model
        self._features = _feature_fn(model, tuple(e.features))

    def extract(self, params, train: bool):
        from jax.experimental import multihost_utils

        feats, labels = {k: [] for k in self.e.features}, []
        for b in eval_splits.batches(self.e.data, self.mesh, train=train, name=f"{type(self).__name__} features"):
            out = self._features(params, b["images"])
            out, y, valid = multihost_utils.process_allgather((out, b["labels"], b["valid"]), tiled=True)
            for k in feats:
                feats[k].append(np.asarray(out[k])[valid])
            labels.append(np.asarray(y)[valid])
        return {k: np.concatenate(v) for k, v in feats.items()}, np.concatenate(labels).astype(np.int32)

    def splits(self, params):
        """Train features padded (label -1) to a multiple of the batch shards, and val features."""
        train_x, train_y = self.extract(params, train=True)
        val_x, val_y = self.extract(params, train=False)
        pad = -len(train_y) % n_batch_shards(self.mesh)
        train_x = {k: np.concatenate([v, np.zeros((pad, v.shape[1]), v.dtype)]) for k, v in train_x.items()}
        train_y = np.concatenate([train_y, np.full((pad,), -1, np.int32)])
        num_classes = self.e.num_classes or int(max(train_y.max(), val_y.max())) + 1
        return train_x, train_y, val_x, val_y, num_classes


class LinearProbe(_Probe):
    """DINOv2's linear probe (a sweep of lrs, best reported) on each feature set."""

    @staticmethod
    def defaults():
        c = _Probe.defaults()
        c.features = ("latent_pooled", "cls4_patch")
        c.epochs = 10
        c.probe_batch_size = 128
        c.lrs = DINOV2_LRS
        return c

    def run(self, params) -> dict:
        train_x, train_y, val_x, val_y, num_classes = self.splits(params)
        out = {}
        for name in self.e.features:
            r = linear_probe(jnp.asarray(train_x[name]), jnp.asarray(train_y), jnp.asarray(val_x[name]),
                             jnp.asarray(val_y), num_classes, lrs=tuple(self.e.lrs), epochs=self.e.epochs,
                             batch_size=min(self.e.probe_batch_size, len(train_y)), mesh=self.mesh)
            out.update({f"{name}/top1": r["top1"], f"{name}/top5": r["top5"], f"{name}/lr": r["lr"]})
        out["top1"] = max(out[f"{n}/top1"] for n in self.e.features)
        return out


class KNN(_Probe):
    """DINO's weighted kNN (k 20, T 0.07, cosine) on each feature set; no hyper-parameter to fit."""

    @staticmethod
    def defaults():
        c = _Probe.defaults()
        c.k = 20
        c.temperature = 0.07
        return c

    def run(self, params) -> dict:
        train_x, train_y, val_x, val_y, num_classes = self.splits(params)
        out = {}
        for name in self.e.features:
            r = knn(jnp.asarray(train_x[name]), jnp.asarray(train_y), jnp.asarray(val_x[name]), jnp.asarray(val_y),
                    num_classes, k=self.e.k, temperature=self.e.temperature, mesh=self.mesh)
            out.update({f"{name}/top1": r["top1"], f"{name}/top5": r["top5"]})
        out["top1"], out["top5"] = out[f"{self.e.features[0]}/top1"], out[f"{self.e.features[0]}/top5"]
        return out
