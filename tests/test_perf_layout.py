"""Layouts of the pre-training step that matter at scale, checked on the tiny config (8 fake CPU
devices, see conftest) from the compiled per-device program:

- the DINO / iBOT prototype logits (rows, K) are split over 'tensor' as well as the batch, and
  the step computes the same losses as on one device;
- on a pure data-parallel mesh the batch-major multi-crop arrays (B, crops, ...) are merged into
  one batch axis without moving activations between devices: the only collectives are gradient
  all-reduces and the all-gathers of (B, E) embeddings that CLIP and KoLeo need.
"""
import collections
import re

import jax
import numpy as np
import pytest

import tiny
from vtp_jax import jobs, sharding
from vtp_jax.jobs import pretrain
from vtp_jax.train import runner

COLLECTIVE = re.compile(r"=\s+(.*?)\s+(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                        r"(?:-start)?\(")
ARRAY = re.compile(r"\b(?:pred|[suf]\d+|bf16)\[([\d,]*)\]")


def collectives(hlo: str) -> dict[str, list[tuple[int, ...]]]:
    """Collective kind -> the shapes of the arrays each instance produces (per device)."""
    found = collections.defaultdict(list)
    for line in hlo.splitlines():
        m = COLLECTIVE.search(line)
        if m:
            shapes = [tuple(int(d) for d in dims.split(",") if d) for dims in ARRAY.findall(m.group(1))]
            found[m.group(2)].extend(shapes)
    return found


@pytest.fixture(scope="module")
def step_on():
    """mesh shape -> (config, params, metrics after one step from init, compiled HLO text);
    one compile per mesh, shared by the tests below."""
    cache = {}

    def run(shape):
        if shape not in cache:
            config = tiny.get_config()
            # K = 80 matches no other dimension of the tiny model (64 = 2 x width would), so an
            # array ending in 80 is a prototype array.
            config.model.head.prototypes = 80
            tr = jobs.build(config, sharding.make_mesh(shape))
            with runner.scope(tr):
                state = tr.init(jax.random.key(0))
                batch = sharding.global_batch(pretrain.synthetic_batch(tr.config), tr.mesh)
                compiled = tr.step.lower(state, batch, tr.consts).compile()
                state, metrics = compiled(state, batch, tr.consts)
            cache[shape] = tr.config, jax.device_get(state.params), jax.device_get(metrics), compiled.as_text()
        return cache[shape]

    return run


def test_tensor_parallel_ssl_step_matches_one_device(step_on):
    """Mesh (data 1, fsdp 4, tensor 2): the head's logits are split over K, so the teacher
    softmax, centering and every cross-entropy sum over K cross devices; losses and updated
    parameters match one device."""
    config, ref_params, ref, _ = step_on((1, 1, 1))
    _, params, metrics, hlo = step_on((1, 4, 2))
    for k in ("loss", "l_clip", "l_ssl", "l_rec", "l_dino", "l_ibot", "l_koleo", "teacher_entropy",
              "teacher_batch_entropy", "kl_teacher_student", "ibot_teacher_entropy"):
        np.testing.assert_allclose(metrics[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert int(metrics["prototypes_used"]) == int(ref["prototypes_used"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), params, ref_params)
    # No (rows, K) array exists whole on a device: every array ending in K holds at most one row
    # (the (1, K) centers); the logits of the head are (rows / 4, K / 2) per device.
    k = config.model.head.prototypes
    whole = [s for s in ARRAY.findall(hlo) if s and s.split(",")[-1] == str(k) and np.prod([int(d) for d in s.split(",")]) > k]
    assert not whole, f"per-device arrays with all {k} prototypes: {sorted(set(whole))}"


def test_data_parallel_step_moves_no_activations(step_on):
    """Mesh (8, 1, 1): parameters replicated, every batch array split on its leading axis. The
    (B, crops, ...) -> (B * crops, ...) reshapes of ssl_global / ssl_local / ssl_masks are local,
    so no all-to-all or collective-permute appears, and everything all-gathered is a small 2-D
    array (the CLIP and KoLeo embeddings, the text tower's pooled tokens, indices): never an
    image, crop, mask or patch-token array. All-reduces carry gradients (parameter-shaped) and
    2-D statistics."""
    config, params, metrics, hlo = step_on((8, 1, 1))
    found = collectives(hlo)
    print({kind: len(shapes) for kind, shapes in found.items()})  # the figure the report quotes
    assert not found.get("all-to-all") and not found.get("collective-permute"), dict(found)
    m, d = config.model, config.data
    embedding = d.batch_clip * max(m.width, m.clip_dim, m.text.width)
    gathered = found.get("all-gather", []) + found.get("reduce-scatter", [])
    assert gathered, "CLIP and KoLeo must all-gather their embeddings"
    big = [s for s in gathered if len(s) > 2 or np.prod(s) > embedding]
    assert not big, f"activations all-gathered: {big}"
    # Gradients may be all-reduced in a transposed layout (the Einsum kernels' (3, heads, head_dim,
    # width) for a (width, 3, heads, head_dim) parameter): compare dimensions as multisets.
    param_shapes = {tuple(sorted(x.shape)) for x in jax.tree.leaves(params)}
    reduced = [s for s in found.get("all-reduce", []) if len(s) > 2 and tuple(sorted(s)) not in param_shapes]
    assert not reduced, f"activations all-reduced: {reduced}"
    assert np.isfinite(metrics["loss"])
