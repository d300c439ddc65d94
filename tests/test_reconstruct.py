"""`python -m vtp_jax.reconstruct` on a tiny release-format checkpoint."""
import numpy as np
import pytest
from PIL import Image
from test_released import P, np_decoder, np_trunk, release_tensors, write_release

from vtp_jax import images, reconstruct

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # ImageNet


def test_psnr_closed_form():
    a = np.full((4, 4, 3), 100, np.uint8)
    assert reconstruct.psnr(a, a) == float("inf")
    assert abs(reconstruct.psnr(a, a + 1) - 20 * np.log10(255.0)) < 1e-9


def test_normalize_roundtrip():
    u8 = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(images.to_uint8(images.normalize(u8)), u8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    tensors = release_tensors()
    write_release(str(folder), tensors)
    return folder, {k: v.astype(np.float64) for k, v in tensors.items()}


def _centre_crop(u8):
    """--size 0: the centre crop to a multiple of the patch size (sizes here leave even margins)."""
    h, w = u8.shape[0] // P * P, u8.shape[1] // P * P
    top, left = (u8.shape[0] - h) // 2, (u8.shape[1] - w) // 2
    return u8[top:top + h, left:left + w]


def _reference_reconstruction(t, u8):
    """uint8 reconstruction by the float64 NumPy forward of the release (test_released)."""
    x = (u8 / 255.0 - MEAN) / STD
    _, patches = np_trunk(t, x[None])[-1]
    recon = np_decoder(t, patches @ t["trunk.feature_bottleneck.weight"].T)[0]
    return np.clip(np.round((recon * STD + MEAN) * 255), 0, 255)


def _random_image(path, shape, seed, mode="RGB"):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


def test_cli_writes_side_by_side_and_psnr(ckpt, tmp_path, capsys):
    folder, t = ckpt
    _random_image(tmp_path / "a.png", (44, 62, 3), 0)
    _random_image(tmp_path / "b.jpg", (30, 20), 1, mode="L")  # greyscale JPEG: read as RGB
    inputs = [(tmp_path / "a.png", (40, 56)), (tmp_path / "b.jpg", (24, 16))]  # multiples of the 8px patch
    rc = reconstruct.main(["--checkpoint", str(folder), "--images", *(str(p) for p, _ in inputs),
                           "--out", str(tmp_path / "out"), "--size", "0"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, (path, (h, w)) in zip(lines, inputs):
        assert line.startswith(f"{path}: {w}x{h} PSNR "), line
        with Image.open(path) as im:
            crop = _centre_crop(np.asarray(im.convert("RGB")))
        assert crop.shape == (h, w, 3)
        out = np.asarray(Image.open(tmp_path / "out" / f"{path.stem}.png"))
        assert out.shape == (h, 2 * w, 3)
        np.testing.assert_array_equal(out[:, :w], crop)
        ref = _reference_reconstruction(t, crop)
        # The CLI rotates q/k in bfloat16 as the release does; our reference in float64. That moves
        # the reconstruction by ~1e-3 relative, which flips the uint8 rounding of ~1% of pixels
        # by one level (measured), never more.
        flips = np.abs(out[:, w:] - ref)
        assert flips.max() <= 1 and flips.mean() < 0.05, (flips.max(), flips.mean())
        rmse = np.sqrt(np.mean((crop - ref) ** 2))
        expected = 10 * np.log10(255.0 ** 2 / rmse ** 2)
        # |rmse(x, a) - rmse(x, b)| <= rmse(a, b) <= sqrt(0.05) levels by the check above, which
        # bounds the PSNR difference; plus 0.005 dB for the 2-decimal print.
        slack = 20 * np.log10(rmse / (rmse - np.sqrt(0.05))) + 0.005
        printed = float(line.split(" PSNR ")[1].removesuffix(" dB"))
        assert abs(printed - expected) < slack, (printed, expected, slack)


def test_cli_reports_each_bad_input_and_goes_on(ckpt, tmp_path, capsys):
    """A 0-byte file, a truncated PNG and a folder without images each get one error line on
    stderr naming them; the good images are still written; the exit code is 1."""
    good = tmp_path / "good.png"
    _random_image(good, (16, 24, 3), 2)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    _random_image(truncated, (64, 64, 3), 3)  # noise: the PNG data cannot be complete in half the file
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    no_images = tmp_path / "no_images"
    no_images.mkdir()
    (no_images / "notes.txt").write_text("not an image")
    bad = [empty, truncated, no_images]
    rc = reconstruct.main(["--checkpoint", str(ckpt[0]), "--images", str(empty), str(good), str(truncated),
                           str(no_images), "--out", str(tmp_path / "out"), "--size", "0"])
    assert rc == 1
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == len(bad), errors
    for path in bad:
        assert sum(line.startswith(f"error: {path}:") for line in errors) == 1, (path, errors)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]
    assert [line.split(" PSNR ")[0] for line in captured.out.strip().splitlines()] == [f"{good}: 24x16"]


def test_cli_reads_image_folders(ckpt, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    _random_image(images / "c.png", (16, 24, 3), 4)
    _random_image(images / "d.bmp", (16, 24, 3), 5)
    (images / "readme.txt").write_text("skipped: not an image")
    rc = reconstruct.main(["--checkpoint", str(ckpt[0]), "--images", str(images), "--out", str(tmp_path / "out"),
                           "--size", "0"])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert [line.split(":")[0] for line in captured.out.strip().splitlines()] == [str(images / "c.png"),
                                                                                  str(images / "d.bmp")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c.png", "d.png"]
    for name in "cd":
        out = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
        with Image.open(next(images.glob(f"{name}.*"))) as im:
            np.testing.assert_array_equal(out[:, :24], np.asarray(im.convert("RGB")))


def test_cli_checkpoint_without_weights_exits_2(ckpt, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_bytes((ckpt[0] / "config.json").read_bytes())
    _random_image(tmp_path / "a.png", (16, 16, 3), 6)
    rc = reconstruct.main(["--checkpoint", str(folder), "--images", str(tmp_path / "a.png"),
                           "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(folder / "model.safetensors") in err, err
