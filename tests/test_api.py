"""The few names users import: load_images / to_pixels around a released model, and bf16 inference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import tiny
import vtp_jax


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return tiny.export_tokenizer(tmp_path_factory.mktemp("release"), 16, text=True)


def test_load_images_resizes_the_shorter_side_and_centre_crops(tmp_path):
    # 64 x 32: left and right quarters red, the middle half blue. Shorter side 32 -> size 32 (no
    # resize), centre crop 32 x 32 = the blue middle only.
    u8 = np.zeros((32, 64, 3), np.uint8)
    u8[:, :16] = u8[:, 48:] = (255, 0, 0)
    u8[:, 16:48] = (0, 0, 255)
    Image.fromarray(u8).save(tmp_path / "wide.png")
    x = vtp_jax.load_images([str(tmp_path / "wide.png"), u8], size=32)
    assert x.shape == (2, 32, 32, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(vtp_jax.to_pixels(x), np.broadcast_to(np.array((0, 0, 255), np.uint8), (2, 32, 32, 3)))
    # ImageNet normalisation, by its published constants
    np.testing.assert_allclose(x[0, 0, 0], (np.array([0, 0, 1.0]) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225],
                               rtol=1e-6)
    # a larger image is resized (shorter side 64 -> 32), still one square per image
    big = np.full((64, 128, 3), 200, np.uint8)
    assert vtp_jax.load_images(big, size=32).shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="nope.png: cannot use this image"):
        vtp_jax.load_images([str(tmp_path / "nope.png")], size=32)


def test_bfloat16_inference_is_close_to_float32_and_returns_float32(release):
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    f32 = vtp_jax.load_pretrained(release)
    bf16 = vtp_jax.load_pretrained(release, dtype=jnp.bfloat16)
    assert bf16.config.dtype == "bfloat16"
    assert {p.dtype for p in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.bfloat16)}
    z32, z16 = np.asarray(f32.encode(x)), np.asarray(bf16.encode(x))
    assert z16.dtype == np.float32
    rel = np.linalg.norm(z16 - z32) / np.linalg.norm(z32)
    assert 0 < rel < 0.03, rel  # bf16 keeps 8 bits of mantissa: close, not equal
    with pytest.raises(ValueError, match="dtype=float16"):
        vtp_jax.load_pretrained(release, dtype=jnp.float16)
