"""Decoding: every image mode to 8-bit RGB (checked against numpy references), EXIF orientation, draft decoding,
and augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from train.data import AugmentConfig, DataError, decode_image
from train.data.decode import BACKGROUND_RGB, example_rng, sample_crop

N = 8  # decoded at the stored size, so no resampling enters the comparison


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def decode_same_size(path: Path) -> np.ndarray:
    return decode_image(str(path), N).astype(np.int64)


def test_grey_l_and_bilevel_replicate_the_channel(tmp_path: Path, rng) -> None:
    grey = rng.integers(0, 256, (N, N), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    assert np.array_equal(decode_same_size(tmp_path / "l.png"), np.repeat(grey[..., None], 3, axis=2))
    bits = rng.integers(0, 2, (N, N)).astype(bool)
    Image.fromarray(bits).convert("1").save(tmp_path / "b.png")
    assert np.array_equal(decode_same_size(tmp_path / "b.png"), np.repeat(bits[..., None] * 255, 3, axis=2))


def composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """float64 reference: alpha * colour + (1 - alpha) * background."""
    a = alpha[..., None].astype(np.float64) / 255
    return a * rgb + (1 - a) * np.array(BACKGROUND_RGB, np.float64)


def test_alpha_modes_are_composited_on_the_background(tmp_path: Path, rng) -> None:
    rgb = rng.integers(0, 256, (N, N, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (N, N), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    got = decode_same_size(tmp_path / "rgba.png")
    assert np.abs(got - composite(rgb, alpha)).max() <= 1
    assert got[0, 0].tolist() == list(BACKGROUND_RGB) and got[0, 1].tolist() == rgb[0, 1].tolist()
    grey = rgb[..., 0]
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "la.png")
    expected = composite(np.repeat(grey[..., None], 3, axis=2), alpha)
    assert np.abs(decode_same_size(tmp_path / "la.png") - expected).max() <= 1


def test_palette_modes_use_the_palette_and_its_transparency(tmp_path: Path, rng) -> None:
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 4, (N, N), dtype=np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette.flatten().tolist())
    img.save(tmp_path / "p.png")
    assert np.array_equal(decode_same_size(tmp_path / "p.png"), palette[index])
    img.save(tmp_path / "pt.png", transparency=2)  # palette entry 2 is fully transparent
    expected = np.where((index == 2)[..., None], np.array(BACKGROUND_RGB), palette[index])
    assert np.array_equal(decode_same_size(tmp_path / "pt.png"), expected)


def test_cmyk_converts_to_rgb(tmp_path: Path, rng) -> None:
    cmy = rng.integers(0, 256, (N, N, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([cmy, np.zeros((N, N), np.uint8)]), "CMYK").save(tmp_path / "c.tif")
    # With no black ink, each RGB channel is the complement of its ink.
    assert np.array_equal(decode_same_size(tmp_path / "c.tif"), 255 - cmy.astype(np.int64))


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path: Path, rng) -> None:
    values = rng.integers(0, 65536, (N, N)).astype(np.uint16)
    values[0, :3] = (0, 65535, 1000)
    Image.fromarray(values).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    expected = np.rint(values.astype(np.float64) * 255 / 65535)
    got = decode_same_size(tmp_path / "i16.png")
    assert np.array_equal(got, np.repeat(expected[..., None], 3, axis=2))
    assert got[0, :3, 0].tolist() == [0, 255, 4]


def test_a_16_bit_image_converts_within_a_few_bytes_per_pixel(tmp_path: Path) -> None:
    # Every value 0..65535 (each 16-bit value's exact 8-bit image), on 2,048 x 2,048 pixels: the conversion's
    # numpy peak stays near the 8-bit output (1 byte per pixel), where a float64 copy of the image was 8 and more.
    import tracemalloc

    from train.data.decode import to_rgb

    side = 2048
    values = (np.arange(side * side) % 65536).astype(np.uint16).reshape(side, side)
    img = Image.fromarray(values)
    tracemalloc.start()
    try:
        rgb = to_rgb(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    got = np.asarray(rgb)
    assert peak <= 2.0 * side * side + 1_000_000, f"{peak / (side * side):.1f} bytes per pixel"
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(got[..., 0], expected) and np.array_equal(got[..., 2], expected)


# EXIF orientation -> how the stored pixels turn into the upright picture (the EXIF 2.3 definitions).
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    6: lambda a: np.rot90(a, k=-1),  # rotate 90 degrees clockwise
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    # A 2x2 grid of flat 16 px blocks (4 colours), stored 32 x 32; JPEG keeps block means within a few levels.
    colours = np.array([[[220, 30, 30], [30, 220, 30]], [[30, 30, 220], [220, 220, 30]]], np.uint8)
    stored = np.kron(colours, np.ones((16, 16, 1), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
    got = decode_image(str(path), 32).astype(np.int64)[8::16, 8::16]  # the centre pixel of each block
    assert np.abs(got - UPRIGHT[orientation](colours).astype(np.int64)).max() < 12


def test_large_jpeg_uses_reduced_size_decoding(tmp_path: Path, monkeypatch) -> None:
    yy, xx = np.mgrid[0:768, 0:1024]
    smooth = np.dstack([xx / 4, yy / 3, (xx + yy) / 7]).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(smooth).save(path, quality=95)
    requests = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        requests.append(size)
        return real(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    got = decode_image(str(path), 64).astype(np.float64)
    assert requests and requests[0][0] < 1024
    full = np.asarray(Image.open(path).convert("RGB").resize((64, 64), Image.Resampling.BOX), np.float64)
    assert np.abs(got - full).mean() < 2.0


def test_unreadable_file_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"x\.jpg: cannot decode"):
        decode_image(str(tmp_path / "x.jpg"), 8)


def test_crops_stay_inside_the_image_and_follow_the_config() -> None:
    aug = AugmentConfig(crop_scale=(0.3, 0.6), crop_ratio=(0.5, 2.0))
    for i in range(200):
        w, h = (384, 512) if i % 2 else (50, 20)
        left, top, right, bottom = sample_crop(w, h, aug, example_rng(0, 0, i))
        assert 0 <= left < right <= w + 1e-9 and 0 <= top < bottom <= h + 1e-9
        assert (right - left) * (bottom - top) <= 0.6 * w * h * (1 + 1e-9)


def test_augmentation_is_deterministic_and_identity_config_is_the_eval_transform(tmp_path: Path, rng) -> None:
    arr = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    path = str(tmp_path / "a.png")
    Image.fromarray(arr).save(path)
    aug = AugmentConfig()
    a = decode_image(path, 16, aug, example_rng(3, 1, 7))
    assert np.array_equal(a, decode_image(path, 16, aug, example_rng(3, 1, 7)))
    assert not np.array_equal(a, decode_image(path, 16, aug, example_rng(3, 2, 7)))
    identity = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False)
    assert np.array_equal(decode_image(path, 16, identity, example_rng(0, 0, 0)), decode_image(path, 16))
    flips = [decode_image(path, 16, AugmentConfig(random_crop=False), example_rng(0, 0, i)) for i in range(8)]
    plain = decode_image(path, 16)
    assert {np.array_equal(f, plain[:, ::-1]) for f in flips} == {True, False}
    assert all(np.array_equal(f, plain) or np.array_equal(f, plain[:, ::-1]) for f in flips)
