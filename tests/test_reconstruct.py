"""`python -m vtp_jax.reconstruct` on a tiny release-format checkpoint."""
import numpy as np
from PIL import Image

from test_released import release_tensors, write_release
from vtp_jax import reconstruct


def test_psnr_closed_form():
    a = np.full((4, 4, 3), 100, np.uint8)
    assert reconstruct.psnr(a, a) == float("inf")
    assert abs(reconstruct.psnr(a, a + 1) - 20 * np.log10(255.0)) < 1e-9


def test_normalize_roundtrip():
    u8 = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(reconstruct.denormalize(reconstruct.normalize(u8)), u8)


def test_cli_writes_side_by_side_and_psnr(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    write_release(str(ckpt), release_tensors())
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (44, 61, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8), mode="L").save(tmp_path / "b.jpg")
    reconstruct.main(["--checkpoint", str(ckpt), "--images", str(tmp_path / "a.png"), str(tmp_path / "b.jpg"),
                      "--out", str(tmp_path / "out"), "--size", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    for line, (h, w) in zip(lines, [(40, 56), (24, 16)]):  # cropped to multiples of the 8px patch
        name = line.split(":")[0].rsplit("/", 1)[-1].rsplit(".", 1)[0]
        out = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
        assert out.shape == (h, 2 * w, 3)
        expected = 10 * np.log10(255.0 ** 2 / np.mean((out[:, :w].astype(float) - out[:, w:]) ** 2))
        assert f"{w}x{h} PSNR {expected:.2f} dB" in line
