import cv2
import numpy as np
import pytest
from PIL import Image

from deblur_diffusion.data.io import image_bit_depth, image_size, read_image, read_image_raw, write_image
from deblur_diffusion.errors import ImageReadError


def test_16_bit_rgb_png_round_trips_exactly(tmp_path, rng):
    pixels = rng.integers(0, 65536, size=(7, 9, 3), dtype=np.uint16)
    path = tmp_path / "deep.png"
    # Written by OpenCV in BGR order, independently of write_image.
    cv2.imwrite(str(path), pixels[:, :, ::-1])
    image = read_image(path)
    assert image.dtype == np.float32 and image.shape == (7, 9, 3)
    np.testing.assert_array_equal(np.round(image.astype(np.float64) * 65535).astype(np.uint16), pixels)
    assert image_bit_depth(path) == 16


def test_8_bit_png_written_by_pillow_reads_as_rgb(tmp_path, rng):
    pixels = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image_raw(tmp_path / "rgb.png"), pixels)
    assert image_bit_depth(tmp_path / "rgb.png") == 8


def test_write_image_keeps_16_bits(tmp_path, rng):
    image = rng.uniform(size=(4, 5, 3)).astype(np.float32)
    path = write_image(tmp_path / "out.png", image, bit_depth=16)
    np.testing.assert_allclose(read_image(path), image, atol=1 / 65535)


def test_grayscale_is_repeated_and_alpha_dropped(tmp_path, rng):
    gray = rng.integers(0, 256, size=(4, 5), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    rgba = rng.integers(0, 256, size=(4, 5, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image_raw(tmp_path / "gray.png"), np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(read_image_raw(tmp_path / "rgba.png"), rgba[:, :, :3])


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    with pytest.raises(ImageReadError, match="corrupt.png"):
        read_image(corrupt)
    with pytest.raises(ImageReadError, match="absent.png"):
        read_image(tmp_path / "absent.png")
    with pytest.raises(ImageReadError, match="corrupt.png"):
        image_size(corrupt)


def test_image_size_reads_the_header(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((11, 13, 3), dtype=np.uint16))
    assert image_size(tmp_path / "a.png") == (11, 13)


def test_an_interrupted_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    import os

    from deblur_diffusion.data import io

    path = write_image(tmp_path / "prior.png", np.full((8, 8, 3), 0.25, np.float32), 16)
    before = read_image_raw(path)

    def killed(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "replace", killed)
    with pytest.raises(ImageReadError, match="No space left"):
        write_image(path, np.full((8, 8, 3), 0.75, np.float32), 16)
    monkeypatch.setattr(io.os, "replace", os.replace)
    np.testing.assert_array_equal(read_image_raw(path), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior.png"]
