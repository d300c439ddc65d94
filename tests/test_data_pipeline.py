"""The grain pipeline: batch contract, sub-batch sampling, sharding, resumption, views, masks."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from vtp_jax import config as config_lib
from vtp_jax import jobs
from vtp_jax.data import pipeline, procedural, sources, transforms
from vtp_jax.images import IMAGENET_MEAN, IMAGENET_STD, normalize


def tiny_config(**overrides):
    c = config_lib.data_config()
    c.image_size, c.global_crops_size, c.local_crops_size, c.patch_size = 32, 32, 16, 8
    c.context_length, c.procedural_size = 16, 32
    c.batch_clip, c.batch_ssl, c.batch_rec, c.local_crops_number = 8, 4, 2, 2
    c.read_threads = 2
    for k, v in overrides.items():
        c[k] = v
    return c


def png(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def coded_source(n):
    """Record i (< 43): a constant grey image of value 6 * i and caption 'item i'; every view of it
    (crops, resizes, flips, blur) stays constant, so a batch row tells which record it came from."""
    return [sources.encode_record(png(np.full((24, 40, 3), 6 * i, np.uint8)), f"item {i}", i, str(i)) for i in range(n)]


def ids(images, axis_image=(-3, -2, -1)):
    """Record ids of normalized constant images (denormalize, read the grey value)."""
    pixels = (images * np.array(IMAGENET_STD, np.float32) + np.array(IMAGENET_MEAN, np.float32)) * 255
    assert np.allclose(pixels.std(axis=axis_image), 0, atol=1.0), "views of a constant image must stay constant"
    values = pixels.mean(axis=axis_image)
    assert np.allclose(values, np.round(values / 6) * 6, atol=1.0)
    return np.round(values / 6).astype(int)


def no_color_config(**overrides):
    return tiny_config(color_jitter_probability=0.0, grayscale_probability=0.0, solarize_probability=0.0, **overrides)


# ---------------------------------------------------------------- procedural data

def test_procedural_is_seeded_random_access_and_labelled():
    a, b = procedural.render_example(3, 17, 48), procedural.render_example(3, 17, 48)
    assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"] and a["label"] == b["label"]
    assert a["image"].shape == (48, 48, 3) and a["image"].dtype == np.uint8
    others = [procedural.render_example(3, i, 48) for i in range(18, 30)] + [procedural.render_example(4, 17, 48)]
    assert all(not np.array_equal(a["image"], o["image"]) for o in others)
    for i in range(40):
        ex = procedural.render_example(0, i, 32)
        words = ex["caption"].split()
        shape = next(w for w in words if w in procedural.SHAPES)  # the first object's shape and colour
        color = next(w for w in words if w in procedural.COLORS)
        assert procedural.CLASS_NAMES[ex["label"]] == f"{color} {shape}"
        assert ex["caption"].endswith("background") and words[1] in procedural.SIZES


def test_procedural_solid_circle_covers_pi_r_squared():
    """Rendering check against the closed form: a lone solid circle covers pi r^2 of the image."""
    size, checked = 96, 0
    for i in range(400):
        ex = procedural.render_example(0, i, size)
        w = ex["caption"].split()
        if w[2] in procedural.COLORS and w[3] == "circle" and w[4] == "on":  # single, unstriped circle
            rgb = np.array(procedural.COLORS[w[2]])
            exact = np.all(np.abs(ex["image"].astype(int) - rgb) <= 2, axis=-1).mean()
            assert exact == pytest.approx(np.pi * procedural.SIZES[w[1]] ** 2, rel=0.08), ex["caption"]
            checked += 1
            if checked == 4:
                break
    assert checked == 4


def test_procedural_relations_hold():
    """'X above Y' puts X's colour centroid higher (smaller row) than Y's, etc."""
    checked = 0
    for i in range(300):
        ex = procedural.render_example(1, i, 64)
        w = ex["caption"].split()
        rel = next((r for r in procedural.RELATIONS if f" {r} " in ex["caption"]), None)
        colors = [x for x in w if x in procedural.COLORS]
        if rel is None or len(set(colors)) < 2 or "striped" in w:
            continue
        centroids = []
        for col in colors:
            yy, xx = np.nonzero(np.all(np.abs(ex["image"].astype(int) - procedural.COLORS[col]) <= 2, axis=-1))
            centroids.append((yy.mean(), xx.mean()))
        (y0, x0), (y1, x1) = centroids
        assert {"above": y0 < y1, "below": y0 > y1, "left of": x0 < x1, "right of": x0 > x1}[rel], ex["caption"]
        checked += 1
    assert checked >= 10


# ---------------------------------------------------------------- batches

def test_batch_matches_the_train_step_contract():
    from vtp_jax.jobs.pretrain import batch_spec

    config = jobs.default_config()
    config.model.patch_size, config.model.text.context_length = 8, 16
    d = config.data
    d.image_size, d.global_crops_size, d.local_crops_size, d.procedural_size = 32, 32, 16, 32
    d.batch_clip, d.batch_ssl, d.batch_rec, d.local_crops_number, d.read_threads = 8, 4, 2, 2, 2
    it = pipeline.make_train_iterator(d, seed=0, process_index=0, process_count=1)
    batch = next(it)
    spec = batch_spec(config)
    assert set(batch) == set(spec)
    for k, s in spec.items():
        assert batch[k].shape == s.shape and batch[k].dtype == s.dtype, k
    assert np.all(batch["tokens"][:, 0] == 49406) and np.all((batch["tokens"] == 49407).sum(1) == 1)
    for k in ("clip_images", "ssl_global", "ssl_local", "rec_images"):  # ImageNet-normalized [0, 1] pixels
        lo, hi = (0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32), (1 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
        assert np.all(batch[k] >= lo - 1e-5) and np.all(batch[k] <= hi + 1e-5), k


def test_sub_batches_are_drawn_from_the_clip_batch_per_step():
    from vtp_jax.data.tokenizer import tokenize

    c = no_color_config(shuffle=False, batch_clip=8, batch_ssl=4, batch_rec=4, local_crops_number=1)
    src = coded_source(40)
    it = pipeline.make_train_iterator(c, seed=5, process_index=0, process_count=1, source=src)
    choices = []
    for step in range(4):
        b = next(it)
        clip = ids(b["clip_images"])
        assert list(clip) == list(range(8 * step, 8 * step + 8))  # shuffle off: records in order
        assert np.array_equal(b["tokens"], tokenize([f"item {i}" for i in clip], 16))
        ssl = ids(b["ssl_global"][:, 0])
        assert np.array_equal(ssl, ids(b["ssl_global"][:, 1])) and np.array_equal(ssl, ids(b["ssl_local"][:, 0]))
        rec = ids(b["rec_images"])
        for sub in (ssl, rec):
            assert len(set(sub)) == len(sub) and set(sub) <= set(clip)
        choices.append(tuple(ssl - 8 * step))
    assert len(set(choices)) > 1  # a fresh draw each step
    again = pipeline.make_train_iterator(c, seed=5, process_index=0, process_count=1, source=src)
    assert [tuple(ids(next(again)["ssl_global"][:, 0]) - 8 * s) for s in range(4)] == choices  # seeded


def test_views_only_computes_what_is_asked():
    c = tiny_config(shuffle=False)
    b = next(pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1, views=("rec",),
                                          source=coded_source(16)))
    assert set(b) == {"rec_images"}
    b = next(pipeline.make_train_iterator(tiny_config(batch_ssl=0), seed=0, process_index=0, process_count=1))
    assert set(b) == {"clip_images", "tokens", "rec_images"}


def test_processes_read_disjoint_covering_shuffled_shards():
    n, p = 24, 3
    c = tiny_config(batch_clip=6, batch_rec=6, batch_ssl=0, num_epochs=1)
    seen = []
    for rank in range(p):
        it = pipeline.make_train_iterator(c, seed=1, process_index=rank, process_count=p, views=("rec",),
                                          source=coded_source(n))
        mine = [i for b in it for i in sorted(ids(b["rec_images"]))]
        assert len(mine) == n // p
        seen.append(mine)
    assert sorted(sum(seen, [])) == list(range(n))
    assert sum(seen, []) != list(range(n))  # globally shuffled, not contiguous ranges
    other = pipeline.make_train_iterator(c, seed=2, process_index=0, process_count=p, views=("rec",),
                                         source=coded_source(n))
    assert [i for b in other for i in sorted(ids(b["rec_images"]))] != seen[0]


def test_epochs_are_reshuffled():
    c = tiny_config(batch_clip=12, batch_rec=12, batch_ssl=0, num_epochs=2)
    it = pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1, views=("rec",),
                                      source=coded_source(12))
    first, second = (list(ids(next(it)["rec_images"])) for _ in range(2))
    assert sorted(first) == sorted(second) == list(range(12)) and first != second
    with pytest.raises(StopIteration):
        next(it)


def test_resume_is_byte_exact_and_survives_orbax(tmp_path):
    import orbax.checkpoint as ocp

    c = tiny_config()
    fresh = pipeline.make_train_iterator(c, seed=3, process_index=0, process_count=1)
    reference = [next(fresh) for _ in range(5)]
    run = pipeline.make_train_iterator(c, seed=3, process_index=0, process_count=1)
    for _ in range(2):
        next(run)
    state = json.loads(json.dumps(run.get_state()))
    manager = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.arange(3.0)}),
                                            data=pipeline.checkpoint_save_args(run)))
    manager.wait_until_finished()
    for restore in ("dict", "orbax"):
        resumed = pipeline.make_train_iterator(c, seed=3, process_index=0, process_count=1)
        if restore == "dict":
            resumed.set_state(state)
        else:
            manager.restore(2, args=ocp.args.Composite(data=pipeline.checkpoint_restore_args(resumed)))
        for k in range(2, 5):
            batch = next(resumed)
            assert batch.keys() == reference[k].keys()
            for key in batch:
                assert batch[key].dtype == reference[k][key].dtype
                assert batch[key].tobytes() == reference[k][key].tobytes(), (restore, k, key)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="batch_ssl=16 > data.batch_clip=8"):
        pipeline.make_train_iterator(tiny_config(batch_ssl=16), seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="batch_clip=8 is not a non-negative multiple of the 3 processes"):
        pipeline.make_train_iterator(tiny_config(batch_ssl=3, batch_rec=3), seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="data.source='webdataset'"):
        pipeline.make_train_iterator(tiny_config(source="webdataset"), seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="local_crops_scale"):
        pipeline.make_train_iterator(tiny_config(local_crops_scale=(0.5, 0.2)), seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="global_crops_size=36 is not a multiple of data.patch_size=8"):
        pipeline.make_train_iterator(tiny_config(global_crops_size=36), seed=0, process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="no ArrayRecord shards"):
        pipeline.make_train_iterator(tiny_config(source="array_record", paths="/nonexistent/*.array_record"), seed=0,
                                     process_index=0, process_count=1)


# ---------------------------------------------------------------- transforms against closed forms

def test_random_resized_crop_box_ranges_and_fallback():
    rng = np.random.default_rng(0)
    for _ in range(500):
        left, top, w, h = transforms.random_resized_crop_box(rng, 200, 120, (0.3, 0.6))
        assert 0 <= left and left + w <= 200 and 0 <= top and top + h <= 120
        assert 0.3 - 0.02 <= w * h / (200 * 120) <= 0.6 + 0.02
        assert 3 / 4 - 0.03 <= w / h <= 4 / 3 + 0.03
    # No try fits a 1000 x 10 strip at scale >= 0.9: centre crop of height 10, width round(10 * 4/3).
    assert transforms.random_resized_crop_box(rng, 1000, 10, (0.9, 1.0)) == ((1000 - 13) // 2, 0, 13, 10)


def test_center_crop_is_adm():
    """ADM on a (4s, 8s) image: two 2x box halvings give (s, 2s), no resize, the central s x s;
    i.e. 4x4 block means of the original's middle columns."""
    s = 8
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4 * s, 8 * s, 3), dtype=np.uint8)
    out = np.asarray(transforms.center_crop(Image.fromarray(pixels), s)).astype(float)
    blocks = pixels.reshape(s, 4, 2 * s, 4, 3).astype(float).mean(axis=(1, 3))
    assert out.shape == (s, s, 3)
    np.testing.assert_allclose(out, blocks[:, s // 2:s // 2 + s], atol=2.0)  # two 8-bit roundings


def test_photometric_ops_closed_forms():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    gray = np.asarray(transforms.grayscale(img)).astype(float)
    luma = pixels.astype(float) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(gray, np.repeat(luma[..., None], 3, -1), atol=1.0)
    assert np.array_equal(np.asarray(transforms.solarize(img)), np.where(pixels < 128, pixels, 255 - pixels))
    np.testing.assert_allclose(normalize(pixels), (pixels / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225],
                               rtol=1e-5, atol=1e-5)
    red = Image.fromarray(np.full((2, 2, 3), (255, 0, 0), np.uint8))
    np.testing.assert_allclose(np.asarray(transforms.adjust_hue(red, 0.5))[0, 0], (0, 255, 255), atol=8)  # opposite hue
    same = transforms.color_jitter(img, rng, 0.0, 0.0, 0.0, 0.0)
    np.testing.assert_allclose(np.asarray(same, float), pixels, atol=6)  # only the 8-bit HSV round trip


def test_block_mask_exact_count_in_blocks():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    sizes = []
    for target in (0, 5, 20, 60, 128):
        for _ in range(20):
            m = transforms.block_mask(rng, (16, 16), target, max_num_patches=128)
            assert m.shape == (16, 16) and m.sum() == target
            if target:
                labels, n = ndimage.label(m)
                sizes.append(target / n)
    assert np.mean(sizes) > 4  # rectangles of >= 4 patches, not scattered single patches
    with pytest.raises(ValueError, match="outside"):
        transforms.block_mask(rng, (4, 4), 17)


def test_ibot_masks_follow_the_dinov2_recipe():
    rng = np.random.default_rng(0)
    n, grid, (lo, hi), p = 40, (8, 8), (0.1, 0.5), 0.5
    for _ in range(5):
        masks = transforms.ibot_masks(rng, n, grid, (lo, hi), p)
        counts = masks.reshape(n, -1).sum(1)
        masked = np.sort(counts[counts > 0])
        assert masks.shape == (n, *grid) and len(masked) == int(n * p)
        edges = np.linspace(lo, hi, int(n * p) + 1) * 64
        assert np.all(masked >= np.floor(edges[:-1])) and np.all(masked <= edges[1:])  # one ratio per bin
    firsts = [np.array_equal(np.flatnonzero(transforms.ibot_masks(rng, n, grid, (lo, hi), p).reshape(n, -1).any(1)),
                             np.arange(int(n * p))) for _ in range(3)]
    assert not all(firsts)  # masked crops are shuffled over the batch, not the first ones


def test_masks_in_batches_respect_config():
    c = tiny_config(batch_clip=16, batch_ssl=16, mask_probability=0.5, mask_ratio_min_max=(0.2, 0.4))
    it = pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1, views=("ssl",))
    b = next(it)
    ratios = b["ssl_masks"].reshape(32, -1).mean(1)
    assert (ratios > 0).sum() == 16
    assert np.all(ratios[ratios > 0] >= np.floor(0.2 * 16) / 16) and np.all(ratios <= 0.4)


# ---------------------------------------------------------------- TFDS ImageNet

def test_tfds_imagenet_source_and_eval_iterator():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=7):
        src = sources.TFDSSource("imagenet2012", split="validation")
        assert len(src) == 7
        names = sources.imagenet_class_names()
        assert len(names) == 1000 and names[0] == "tench"
        labels = []
        for i in range(7):
            r = sources.decode_record(src[i])
            labels.append(r["label"])
            assert r["caption"].decode() == f"a photo of a {names[r['label']]}."
            assert Image.open(io.BytesIO(r["image"])).format == "JPEG"
        batches = list(pipeline.make_eval_iterator(src, image_size=16, batch_size=4))
        assert [b["images"].shape for b in batches] == [(4, 16, 16, 3)] * 2
        assert [int(b["valid"].sum()) for b in batches] == [4, 3]
        assert list(np.concatenate([b["labels"][b["valid"]] for b in batches])) == labels
        it = pipeline.make_train_iterator(tiny_config(source="tfds", tfds_split="validation", batch_clip=4, batch_ssl=2,
                                                      batch_rec=2), seed=0, process_index=0, process_count=1)
        assert next(it)["clip_images"].shape == (4, 32, 32, 3)
