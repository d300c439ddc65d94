"""The compile plan (vtp_jax/train/aot.py): jobs compiled by the TPU compiler for real topologies
on compile-only devices (libtpu, the [tpu] extra), nothing allocated or run.

Meshes and memory come from the TPU compiler here, not XLA:CPU; the figures they are checked
against are computed independently (global shapes x itemsize, a hand-counted HLO module, the
chip grids Cloud documents).
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import tiny
from vtp_jax import config as config_lib
from vtp_jax import jobs
from vtp_jax.train import aot, runner

GiB = 1 << 30


def tiny_config(**train):
    """tests/tiny.py in bf16 with a batch of 64 / 32 / 32: 16 / 8 / 8 per shard on 4 chips, so
    train.accum_steps can be 1, 2, 4 or 8."""
    c = tiny.get_config()
    c.model.dtype = "bfloat16"
    c.data.batch_clip, c.data.batch_ssl, c.data.batch_rec = 64, 32, 32
    c.train.mesh = (1, 4, 1)
    c.train.update(**train)
    return c


@pytest.fixture(scope="module")
def v5e_4():
    return aot.topology_devices("v5e-4")


@pytest.fixture(scope="module")
def tiny_on_v5e(v5e_4):
    """The tiny pretrain step compiled for a v5e 2x2 slice, FSDP over its 4 chips."""
    c = tiny_config()
    return c, aot.compile_step(jobs.get("pretrain"), c, runner.make_mesh(c, v5e_4))


# ------------------------------------------------------------------------------------------------
# Topologies and meshes (no compile).
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, grid", [
    # Cloud's documented default slice shapes (v4 / v5p names count TensorCores, two per chip).
    ("v4-8", ("v4", (2, 2, 1))), ("v4-128", ("v4", (4, 4, 4))), ("v4-256", ("v4", (4, 4, 8))),
    ("v5p-8", ("v5p", (2, 2, 1))), ("v5p-64", ("v5p", (2, 4, 4))), ("v5p-128", ("v5p", (4, 4, 4))),
    ("v5p-1024", ("v5p", (8, 8, 8))), ("v5e-8", ("v5e", (2, 4))), ("v5litepod-16", ("v5e", (4, 4))),
    ("v5e-256", ("v5e", (16, 16))), ("v6e-32", ("v6e", (4, 8))), ("v6e-256", ("v6e", (16, 16))),
    ("v5p:4x4x12", ("v5p", (4, 4, 12))), ("V6E:8x16", ("v6e", (8, 16))),
])
def test_cloud_names_become_chip_grids(name, grid):
    assert aot.chip_grid(name) == grid


@pytest.mark.parametrize("name, says", [("v5p-384", "v5p:4x4x12"), ("v5p-127", "chip grid"), ("tpu-128", "v5p-N"),
                                        ("v5e:4x4x4", "2 sizes")])
def test_unknown_topology_names_are_one_config_error(name, says):
    with pytest.raises(config_lib.ConfigError, match="train.compile_for") as e:
        aot.chip_grid(name)
    assert says in str(e.value)


def test_vtp_l_mesh_builds_on_a_v5p_128_and_misfits_name_what_fits():
    """configs/vtp_l.py's (-1, 8, 1) on v5p:4x4x4 (jax.make_mesh refuses: 8 is no product of the
    physical 4s) and on v6e:16x16: fsdp neighbours are neighbouring chips."""
    c = tiny.load_config("vtp_l")
    for name, data in (("v5p-128", 8), ("v6e-256", 32)):
        devices = aot.topology_devices(name)
        mesh = runner.make_mesh(c, devices)
        assert dict(mesh.shape) == {"data": data, "fsdp": 8, "tensor": 1}
        for row in mesh.devices.reshape(-1, 8):  # an fsdp group: a block of 8 neighbouring chips (8x1, 4x2, ...)
            coords = np.array([d.coords for d in row])
            assert len({tuple(x) for x in coords}) == 8 and np.prod(np.ptp(coords, axis=0) + 1) == 8, coords
    c.train.mesh = (-1, 3, 1)
    with pytest.raises(config_lib.ConfigError, match=r"train.mesh=\(-1, 3, 1\)") as e:
        runner.make_mesh(c, aot.topology_devices("v5p-128"))
    assert "(-1, 8, 1)" in str(e.value) and "(-1, 16, 1)" in str(e.value)


# ------------------------------------------------------------------------------------------------
# The pieces the plan is made of, against hand-made inputs.
# ------------------------------------------------------------------------------------------------
HLO = """HloModule m

%body (p: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
  %p = (s32[], bf16[8,128]) parameter(0)
  %ag = bf16[32,128]{1,0} all-gather(%x), channel_id=1, dimensions={0}
  %f = bf16[8,128]{1,0} fusion(%y), kind=kLoop, calls=%fused
  ROOT %t = (s32[], bf16[8,128]) tuple(%i, %f)
}

%fused (a: bf16[8,128]) -> bf16[8,128] {
  %a = bf16[8,128]{1,0} parameter(0)
  ROOT %ar = bf16[8,128]{1,0} all-reduce(%a), channel_id=2, to_apply=%add
}

%cond (p: (s32[], bf16[8,128])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%body3 (q: (s32[], f32[16])) -> (s32[], f32[16]) {
  %q = (s32[], f32[16]) parameter(0)
  %a2a = f32[16]{0:T(256)} all-to-all(%v), channel_id=3, dimensions={0}
  ROOT %u = (s32[], f32[16]) tuple(%j, %a2a)
}

%cond3 (q: (s32[], f32[16])) -> pred[] {
  %q = (s32[], f32[16]) parameter(0)
  %three = s32[]{:T(128)} constant(3)
  %j = s32[]{:T(128)} get-tuple-element(%q), index=0
  ROOT %lt = pred[]{:T(512)} compare(%j, %three), direction=LT, metadata={op_name="jit(step)/while/cond/lt"}
}

ENTRY %main (w: f32[256,64]) -> f32[256,64] {
  %w = f32[256,64]{1,0} parameter(0), sharding={replicated}, metadata={op_name="state.params[\\'w\\']"}
  %loop = (s32[], bf16[8,128]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"6"}}
  %loop3 = (s32[], f32[16]) while(%init3), condition=%cond3, body=%body3, metadata={op_name="jit(step)/while"}
  %rs-start = ((f32[256,64]), f32[64,64]) reduce-scatter-start(%w), dimensions={0}
  %rs = f32[64,64]{1,0} reduce-scatter-done(%rs-start)
  ROOT %out = f32[256,64]{1,0} copy(%w)
}
"""


def test_collectives_and_arguments_of_an_hlo_module_counted_by_hand():
    """Six trips of a loop with an all-gather of 32 x 128 bf16 and, in a fusion, an all-reduce of
    8 x 128 bf16; three trips of a loop whose count only its condition says (`i < 3`: the TPU
    compiler drops known_trip_count) around an all-to-all of 16 f32; one async reduce-scatter of
    64 x 64 f32 (its -start is not a second op)."""
    got = aot.collectives(HLO)
    assert got == {"all-gather": {"count": 6, "bytes": 6 * 32 * 128 * 2},
                   "all-reduce": {"count": 6, "bytes": 6 * 8 * 128 * 2},
                   "all-to-all": {"count": 3, "bytes": 3 * 16 * 4},
                   "reduce-scatter": {"count": 1, "bytes": 64 * 64 * 4}}
    assert aot.loops(HLO) == [6, 3]
    assert aot.arguments(HLO) == [("state.params['w']", 256 * 64 * 4)]


def test_accum_steps_prediction_and_search_on_known_sizes():
    """Totals a + b / k with a = 10, b = 80: k = 8 is the smallest of (1, 2, 4, 8, 16) under 20.5,
    found with 4 'compiles' (1, 16, the predicted 8, and 4 to see that nothing smaller fits), never 2."""
    a, b = 10.0, 80.0
    assert aot.predict_accum(1, a + b, 16, a + b / 16, (1, 2, 4, 8, 16), 20.5) == 8
    compiled = []

    def compile_k(k):
        compiled.append(k)
        return {"memory": {"total": a + b / k}}

    k, records = aot.smallest_fit(compile_k, (1, 2, 4, 8, 16), 20.5)
    assert (k, compiled) == (8, [1, 16, 8, 4])
    assert aot.smallest_fit(compile_k, (1, 2), 5.0)[0] is None  # nothing fits
    # The prediction is off (totals are not linear in 1 / k): the search steps up to the first k
    # that fits, or down while a smaller one fits too (k = 1 holding far more than its share, as on TPU).
    def totals(table):
        compiled.clear()
        return lambda k: compiled.append(k) or {"memory": {"total": table[k]}}

    k, _ = aot.smallest_fit(totals({1: 90, 2: 50, 4: 30, 8: 27, 16: 14}), (1, 2, 4, 8, 16), 26)
    assert k == 16 and compiled == [1, 16, 8]  # 8 predicted (19), compiled 27: up to 16
    k, _ = aot.smallest_fit(totals({1: 90, 2: 18, 4: 15, 8: 12, 16: 10}), (1, 2, 4, 8, 16), 20)
    assert k == 2 and compiled == [1, 16, 8, 4, 2]


# ------------------------------------------------------------------------------------------------
# Compiled by the TPU compiler.
# ------------------------------------------------------------------------------------------------
def test_tiny_pretrain_compiles_for_v5e_and_fsdp_splits_the_parameters(tiny_on_v5e):
    c, r = tiny_on_v5e
    m = r["memory"]
    assert 0 < m["total"] < 0.5 * GiB and m["total"] == sum(m[k] for k in ("arguments", "temporaries", "outputs",
                                                                              "program"))
    # The largest parameter, the text tower's token embedding (vocab x width, float32), is FSDP-
    # sharded on its width: each chip's compiled argument is a quarter of the unsharded tensor, and
    # so are its two AdamW moments.
    whole = c.model.text.vocab_size * c.model.text.width * 4
    per_chip = {n: b for n, b in r["largest_arguments"]}
    assert per_chip["state.params['text']['token_embedding']"] == whole // 4
    moments = [b for n, b in per_chip.items() if n.endswith("['text']['token_embedding']") and (".mu" in n or ".nu" in n)]
    assert moments == [whole // 4] * 2
    assert r["flops_per_chip"] > 0 and r["accum_choices"] == [1, 2, 4, 8]
    assert {"all-gather", "all-reduce"} <= set(r["collectives"])  # FSDP gathers, gradient reductions


def test_two_slices_with_a_dcn_mesh_through_the_plan(tmp_path):
    """Two v5e 2x2 slices, data parallel across them (dcn_mesh (2, 1, 1)): the plan the CLI runs,
    W/compiled.json as a launch script reads it. At accum_steps 2 the TPU compiler's collective
    pipeliner unrolls this autoencoder's accumulation loop on multi-slice (one slice keeps it,
    benchmarks/RESULTS.md, "The accumulation loop on two slices"); the table says so (VTP-L on
    2 x v5e-256 held more at k = 2 than at 1)."""
    c = autoencoder_config(compile_for="v5e-4", compile_slices=2, mesh=(2, 4, 1), dcn_mesh=(2, 1, 1), accum_steps=2)
    report = jobs.run(c, str(tmp_path))
    saved = json.loads((tmp_path / "compiled.json").read_text())
    assert saved["fits"] and saved["chips"] == 8 and saved["slices"] == 2
    assert saved["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and saved["grid"] == "v5e:2x2"
    assert saved["chosen"]["accum_steps"] == 2 and saved["hbm_per_chip"] == 16 * GiB
    assert saved["chosen"]["memory"]["total"] == report["chosen"]["memory"]["total"] > 0
    assert 2 not in saved["chosen"]["loops"], saved["chosen"]["loops"]
    assert "note: the compiler unrolled the 2-step accumulation loop" in aot.table(report)


def autoencoder_config(**train):
    """tiny.autoencoder_config at 64 px, a batch of 1024 (256 per shard on 4 chips)."""
    c = tiny.autoencoder_config(image_size=64)
    c.train.mesh = (1, 4, 1)
    c.train.update(**train)
    return c


def test_accum_steps_auto_picks_the_k_two_compiled_sizes_predict(v5e_4, tmp_path):
    """With the usable memory set between the compiled k = 1 size and the k = 2 size predicted
    from k = 1 and k = 256, accum_steps = 0 compiles k = 1, 256 and the predicted 2, which fits:
    three programs, and k = 2, the smallest that fits (the step-down search on known sizes is
    test_accum_steps_prediction_and_search_on_known_sizes)."""
    mesh = runner.make_mesh(autoencoder_config(), v5e_4)
    t1, t256 = (aot.compile_step(jobs.get("pretrain"), autoencoder_config(accum_steps=k), mesh)["memory"]["total"]
                for k in (1, 256))
    t2 = t256 + (t1 - t256) / (1 - 1 / 256) * (1 / 2 - 1 / 256)
    limit = (t1 + t2) / 2
    choices = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert aot.predict_accum(1, t1, 256, t256, choices, limit) == 2
    assert aot.predict_accum(1, t1, 256, t256, choices, t2 * 0.99) == 4  # the prediction follows the limit
    report = jobs.run(autoencoder_config(accum_steps=0, compile_for="v5e-4", hbm_margin=1 - limit / (16 * GiB)),
                      str(tmp_path))
    tried = {r["accum_steps"]: r["memory"]["total"] for r in report["tried"]}
    assert set(tried) == {1, 2, 256} and report["chosen"]["accum_steps"] == 2
    assert tried[2] <= report["limit"] < tried[1]
    assert "accum_steps=2: the smallest of [1, 2, 4, 8, 16, 32, 64, 128, 256] whose step fits" in report["why"]


def test_a_step_too_big_for_a_v5e_chip_exits_non_zero_with_what_it_needs(tmp_path):
    """64 Mi DINO prototypes (replicated: the head's prototypes shard over the tensor axis, 1 here)
    hold the parameter, the teacher, two moments and the gradient at 4 GiB each: more than a v5e
    chip's 16 GiB. One line names what it needs; W/compiled.json has every try."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "vtp_jax.main", "--config=tests/tiny.py", "--workdir", str(tmp_path),
           "--config.train.compile_for=v5e-4", "--config.train.mesh=(1,4,1)", "--config.model.head.prototypes=67108864"]
    p = subprocess.run(cmd, cwd=tiny.ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0, p.stdout[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: pretrain does not fit v5e:2x2 (TPU v5 lite): the smallest compiled step needs "), last
    needs = float(re.match(r"(at least )?([0-9.]+) GiB", last.split("needs ")[1])[2])
    assert needs > 5 * 4 and "usable (16 GiB HBM, hbm_margin 0.1)" in last
    assert last.endswith("compiled.json has every try; train.accum_steps=0 searches the k that fits"), last
    saved = json.loads((tmp_path / "compiled.json").read_text())
    assert not saved["fits"] and saved["tried"][0]["memory"]["total"] / GiB == pytest.approx(needs, abs=0.06)
    assert "DOES NOT FIT" in p.stdout


def test_a_launch_resolves_auto_fields_on_its_own_devices(tmp_path):
    """On the CPU (no memory limit known) accum_steps = 0 resolves to the smallest k and remat
    'auto' to the policy with the fewest FLOPs: no recomputation."""
    c = autoencoder_config(accum_steps=0, mesh=(1, 1, 1))
    c.data.image_size = c.data.procedural_size = 16
    c.data.batch_clip = c.data.batch_ssl = c.data.batch_rec = 8
    c.model.remat = "auto"
    assert config_lib.auto_fields(c) == ["train.accum_steps", "model.remat"]
    resolved = aot.resolve(jobs.get("pretrain"), c)
    assert resolved.train.accum_steps == 1 and resolved.model.remat == "none"
    with pytest.raises(config_lib.ConfigError, match="train.accum_steps, model.remat: 'auto' is chosen before a run"):
        runner.run(jobs.get("pretrain"), c, str(tmp_path))
