"""Decode one image file to a uint8 RGB array of a fixed size, with optional train-time augmentation.

Order of work: read the header (size, EXIF orientation), choose the crop box in the upright frame, ask
libjpeg for a reduced-size decode that still covers the crop at the output size (`Image.draft`), decode,
apply the EXIF orientation, convert the mode to 8-bit RGB, then crop and resize in one `resize(box=...)`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import ExifTags, Image, ImageOps

from porting.preprocessing import BACKGROUND_RGB as BACKGROUND_RGB  # re-exported: train.data names it
from porting.preprocessing import TRAINER_INTERPOLATION, to_rgb

from .checks import DataError

# EXIF orientations that swap width and height.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
# The trainers' resize (bilinear), antialiased when shrinking (Pillow scales the filter support)
RESAMPLE = Image.Resampling[TRAINER_INTERPOLATION.upper()]
# Attempts at a crop of the sampled area and aspect before falling back to the largest fitting one.
_CROP_ATTEMPTS = 10


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Train-time augmentation: random resized crop and horizontal flip.

    crop_scale is the crop's area as a fraction of the image; crop_ratio multiplies the image's own aspect
    ratio (so scale=(1, 1), ratio=(1, 1) is exactly the evaluation transform: the whole image resized).
    """

    random_crop: bool = True
    crop_scale: tuple[float, float] = (0.7, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise DataError(f"AugmentConfig.crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise DataError(f"AugmentConfig.crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")

    @property
    def enabled(self) -> bool:
        """Whether any augmentation is applied."""
        return self.random_crop or self.hflip


NO_AUGMENT = AugmentConfig(random_crop=False, hflip=False)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one (seed, epoch, record index): independent of batch size and worker count."""
    return np.random.default_rng([seed, epoch, index])


def sample_crop(
    width: int, height: int, aug: AugmentConfig, rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """A random (left, top, right, bottom) crop box inside a width x height image."""
    area = width * height
    log_lo, log_hi = math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])
    aspect = width / height
    for _ in range(_CROP_ATTEMPTS):
        target = area * rng.uniform(*aug.crop_scale)
        ratio = math.exp(rng.uniform(log_lo, log_hi)) * aspect
        w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if w <= width and h <= height:
            break
    else:  # keep the last aspect, shrunk to fit
        shrink = min(width / w, height / h)
        w, h = w * shrink, h * shrink
    left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return (left, top, left + w, top + h)


def crop_and_flip(
    width: int, height: int, aug: AugmentConfig, rng: np.random.Generator | None
) -> tuple[tuple[float, float, float, float], bool]:
    """The crop box (in a width x height image) and the flip that `aug` draws from `rng`, in that order; the whole
    image, unflipped, without augmentation."""
    whole = (0.0, 0.0, float(width), float(height))
    if not aug.enabled:
        return whole, False
    if rng is None:
        raise ValueError("augmentation needs an rng")
    box = sample_crop(width, height, aug, rng) if aug.random_crop else whole
    return box, aug.hflip and bool(rng.integers(2))


def decode_image(
    path: str,
    image_size: int,
    aug: AugmentConfig = NO_AUGMENT,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Decode `path` to uint8 (image_size, image_size, 3); with `aug`, crop and flip using `rng`."""
    if aug.enabled and rng is None:
        raise ValueError("decode_image: augmentation needs an rng")
    try:
        with Image.open(path) as img:
            width, height = img.size
            upright = img.getexif().get(ExifTags.Base.Orientation, 1) in _TRANSPOSING_ORIENTATIONS
            up_w, up_h = (height, width) if upright else (width, height)
            box, flip = crop_and_flip(up_w, up_h, aug, rng)
            if img.format == "JPEG":
                # Reduced-size decoding: the smallest DCT scale whose crop still has >= image_size pixels per side.
                scale = image_size / min(box[2] - box[0], box[3] - box[1])
                if scale < 1:
                    img.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
            rgb = to_rgb(ImageOps.exif_transpose(img))
            fx, fy = rgb.width / up_w, rgb.height / up_h
            out = rgb.resize(
                (image_size, image_size), RESAMPLE, box=(box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
            )
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode image: {e}") from e
    array = np.asarray(out, dtype=np.uint8)
    return array[:, ::-1] if flip else array
