"""Every job's state is laid out from the logical axis names its parameters carry through
`tx.init`: each optimizer moment, teacher or EMA copy of a parameter is sharded exactly as that
parameter, counters and rngs are replicated, and FSDP really splits the big leaves (8 CPU devices).
"""
import json

import jax
import numpy as np
import pytest

import tiny
from vtp_jax import jobs, sharding
from vtp_jax.checkpoints import tokenizers
from vtp_jax.train import runner

SIZE = 16
MESH = (1, 8, 1)  # FSDP over 8 devices: parameters with an 'embed' axis of 32 are split


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny.export_tokenizer(tmp_path_factory.mktemp("tokenizer"), SIZE, text=False)


def _names(path):
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _check(trainer, params_field: str, followers: list[str]):
    """Every leaf of the state's `followers` whose path ends with a parameter's path is a copy of
    that parameter: the same shape, sharded as it, so each device holds the same slice shape of
    both; every other leaf is replicated. FSDP really splits some parameter."""
    abstract = jax.tree_util.tree_flatten_with_path(jax.eval_shape(trainer.init, jax.random.key(0)))[0]
    state_leaves = jax.tree_util.tree_flatten_with_path(trainer.shardings)[0]
    assert [_names(p) for p, _ in abstract] == [_names(p) for p, _ in state_leaves]
    shapes = {_names(p): leaf.shape for p, leaf in abstract}
    params = {_names(p)[1:]: (s, shapes[_names(p)]) for p, s in state_leaves if _names(p)[0] == params_field}
    assert any(s.shard_shape(shape) != shape for s, shape in params.values()), "FSDP shards no parameter"
    matched = 0
    for path, s in state_leaves:
        names = _names(path)
        if names[0] not in followers:
            continue
        owner = next((names[i:] for i in range(len(names)) if names[i:] in params), None)
        where = "/".join(names)
        if owner is not None:
            p_sharding, p_shape = params[owner]
            assert shapes[names] == p_shape, f"{where}: shape {shapes[names]}, its parameter's {p_shape}"
            assert s == p_sharding, f"{where}: {s.spec}, its parameter has {p_sharding.spec}"
            assert s.shard_shape(shapes[names]) == p_sharding.shard_shape(p_shape), where
            matched += 1
        else:
            assert s.is_fully_replicated, f"{where} is no parameter copy but is sharded {s.spec}"
            assert s.shard_shape(shapes[names]) == shapes[names], where
    assert not followers or matched >= len(params), f"only {matched} follower leaves for {len(params)} parameters"
    return matched


def test_pretrain_moments_and_teacher_follow_their_parameters():
    c = tiny.get_config()
    c.train.mesh = MESH
    tr = jobs.build(c, sharding.make_mesh(MESH))
    n = _check(tr, "params", ["opt_state", "teacher_params", "dino_center", "ibot_center", "step", "rng"])
    assert n >= 2 * len(jax.tree.leaves(tr.shardings.params))  # mu and nu of every parameter


def test_stage2_decoder_moments_follow_the_decoder(tokenizer):
    c = tiny.load_config("demo_stage2")
    c.train.init_from, c.train.mesh = tokenizer, MESH
    c.data.update(image_size=SIZE, procedural_size=SIZE, batch_clip=8, batch_rec=8)
    c.stage2.update(disc_ndf=32, disc_layers=1)
    c.evals = {}
    tr = jobs.build(c, sharding.make_mesh(MESH))
    _check(tr, "decoder", ["opt_state"])


def test_dit_moments_and_ema_follow_their_parameters(tokenizer, tmp_path):
    latents = tmp_path / "latents"  # what the DiT job reads to build itself: meta and stats
    latents.mkdir()
    (latents / "meta.json").write_text(json.dumps(dict(shape=[2, 2, 8], dtype="float16", tokenizer=tokenizer,
                                                       num_classes=4, image_size=SIZE, records=8)))
    np.savez(latents / "stats.npz", mean=np.zeros(8, np.float32), std=np.ones(8, np.float32))
    c = tiny.load_config("dit_demo")
    c.dit.update(latents=str(latents), batch_size=8, size="tiny", patch_size=1)
    c.train.mesh = MESH
    c.evals = {}
    tr = jobs.build(c, sharding.make_mesh(MESH))
    n = _check(tr, "params", ["opt_state", "ema_params", "step", "rng"])
    assert n >= 3 * len(jax.tree.leaves(tr.shardings.params))  # EMA, mu and nu


def test_eval_params_are_laid_out_by_name(tokenizer):
    c = tiny.load_config("eval_demo")
    c.eval.checkpoint, c.train.mesh = tokenizer, MESH
    c.evals = {"reconstruction": c.evals.reconstruction}
    tr = jobs.build(c, sharding.make_mesh(MESH))
    _check(tr, "params", [])
    # The eval job's state holds the tokenizer's weights, each placed as its parameter's name says.
    _, want = tokenizers.load_tokenizer(tokenizer)
    with runner.scope(tr):
        state = tr.job.start(tr.init(jax.random.key(0)))
    jax.tree.map(_assert_placed, state.params, tr.shardings.params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), want)


def _assert_placed(array, s):
    assert array.sharding == s, (array.sharding, s)
    assert {shard.data.shape for shard in array.addressable_shards} == {s.shard_shape(array.shape)}


def test_mesh_follows_the_devices_and_misfits_are_one_config_error():
    from vtp_jax.config import ConfigError

    c = tiny.get_config()
    c.train.mesh = (-1, 4, 1)
    mesh = runner.make_mesh(c)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1} and sorted(d.id for d in mesh.devices.flat) == list(range(8))
    c.train.mesh = (3, 4, 1)
    with pytest.raises(ConfigError, match=r"train.mesh=\(3, 4, 1\).*needs 12 devices, 8 are present"):
        runner.make_mesh(c)
    c.train.mesh, c.train.dcn_mesh = (2, 4, 1), (2, 1, 1)  # two slices, but one process and no TPU slices here
    with pytest.raises(ConfigError, match=r"train.dcn_mesh=\(2, 1, 1\)"):
        runner.make_mesh(c)
