"""iREPA's spatial-structure metrics and the latent's channel statistics (evals/latent_structure.py),
against a case computed by hand, a brute-force NumPy re-derivation of the definitions, and the
evaluator against NumPy on a tiny tokenizer's latents."""
import itertools

import jax
import numpy as np
import pytest

import tiny
from vtp_jax import sharding
from vtp_jax.evals import latent_structure
from vtp_jax.train import runner


def test_spatial_structure_hand_computed_2x2():
    # Tokens of a 2 x 2 grid: the top row points along e0, the bottom row along e1 (lengths vary:
    # cosines ignore them). 4-neighbours: (00,01) cos 1, (10,11) cos 1, (00,10) and (01,11) cos 0
    # -> local 0.5. Distance 2: (00,11), (01,10), cos 0 -> far 0. LDS = 0.5; the pair cosine falls
    # from 0.5 at d = 1 to 0 at d = 2, a slope of -0.5 -> CDS = 0.5. The unit tokens' mean is
    # (0.5, 0.5); every centred token has squared norm 0.5 -> RMSC = sqrt(0.5).
    z = np.array([[[[1.0, 0.0], [3.0, 0.0]], [[0.0, 2.0], [0.0, 0.5]]]], np.float32)
    out = latent_structure.spatial_structure(z, far_dist=2, dmax=8)
    assert float(out["lds"][0]) == pytest.approx(0.5, abs=1e-6)
    assert float(out["cds"][0]) == pytest.approx(0.5, abs=1e-6)
    assert float(out["rmsc"][0]) == pytest.approx(np.sqrt(0.5), abs=1e-6)


def _brute_force(z, far_dist, dmax):
    """The definitions, one token pair at a time."""
    b, h, w, _ = z.shape
    cells = list(itertools.product(range(h), range(w)))
    out = {"lds": [], "cds": [], "rmsc": []}
    for img in z.astype(np.float64):
        unit = {p: img[p] / np.linalg.norm(img[p]) for p in cells}
        by_d = {}
        for p, q in itertools.permutations(cells, 2):
            by_d.setdefault(abs(p[0] - q[0]) + abs(p[1] - q[1]), []).append(unit[p] @ unit[q])
        far = [v for d, vals in by_d.items() if d >= far_dist for v in vals]
        out["lds"].append(np.mean(by_d[1]) - np.mean(far))
        ds = [d for d in range(1, dmax + 1) if d in by_d]
        out["cds"].append(-np.polyfit(ds, [np.mean(by_d[d]) for d in ds], 1)[0])
        u = np.stack([unit[p] for p in cells])
        out["rmsc"].append(np.sqrt(np.mean(np.sum((u - u.mean(0)) ** 2, -1))))
    return {k: np.array(v) for k, v in out.items()}


def test_spatial_structure_equals_brute_force_on_random_grids():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 5, 6, 4)).astype(np.float32)
    z[1] += np.linspace(-2, 2, 5)[:, None, None]  # a smooth component: local pairs more alike
    got = latent_structure.spatial_structure(z, far_dist=4, dmax=6)
    want = _brute_force(z, far_dist=4, dmax=6)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert want["lds"][1] > want["lds"][0]  # the smooth image has the stronger structure


def test_spatial_structure_unreachable_far_dist_is_an_error():
    with pytest.raises(ValueError, match="far_dist=6 on a 2 x 2 grid"):
        latent_structure.spatial_structure(np.ones((1, 2, 2, 3), np.float32), far_dist=6)


def test_effective_rank_closed_forms():
    assert latent_structure.effective_rank([2.0, 0, 0]) == pytest.approx(1.0)
    assert latent_structure.effective_rank([3.0, 3.0, 3.0, 3.0]) == pytest.approx(4.0)
    p = np.array([0.5, 0.25, 0.25])
    assert latent_structure.effective_rank(2 * p) == pytest.approx(np.exp(-(p * np.log(p)).sum()))


def test_evaluator_equals_numpy_on_a_tiny_tokenizers_latents():
    from vtp_jax.data import eval_splits, pipeline
    from vtp_jax.evals import evaluator
    from vtp_jax.models import vtp

    model_cfg = tiny.get_config().model
    model_cfg.head.prototypes = 0
    params = jax.device_get(jax.jit(lambda r: vtp.init_params(model_cfg, r, 16))(jax.random.key(0)))
    e = evaluator.entry("latent_structure", far_dist=2, data=dict(source="procedural", procedural_size=16,
                                                                    image_size=16, batch_size=8, num_images=20))
    mesh = sharding.make_mesh((1, 1, 1))
    with runner.scope_of(mesh):
        ev = evaluator.evaluator_class("latent_structure")(vtp.VTP(model_cfg), mesh, evaluator.resolved(e))
        out = ev.run(jax.device_put(params))
    d = evaluator.resolved(e).data
    x = next(pipeline.make_eval_iterator(eval_splits.make_source(d), image_size=16, batch_size=20))["images"]
    z = np.asarray(vtp.VTP(model_cfg).apply({"params": params}, x, method=vtp.VTP.encode), np.float64)
    want = _brute_force(z, far_dist=2, dmax=8)
    for k in ("lds", "cds", "rmsc"):
        assert out[k] == pytest.approx(want[k].mean(), rel=1e-4, abs=1e-6), k
    tokens = z.reshape(-1, z.shape[-1])
    std = tokens.std(0)
    assert out["channel_std_mean"] == pytest.approx(std.mean(), rel=1e-4)
    assert out["channel_std_spread"] == pytest.approx(std.max() / std.min(), rel=1e-4)
    s = np.linalg.svd(tokens - tokens.mean(0), compute_uv=False)
    assert out["effective_rank"] == pytest.approx(latent_structure.effective_rank(s), rel=1e-4)
    assert 1.0 <= out["effective_rank"] <= z.shape[-1]
