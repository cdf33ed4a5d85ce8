"""The preprocessing record that travels with weights: what input they expect, their slope and class names.

One record per weights file (docs/porting.md, "Preprocessing"): how uint8 RGB pixels become the network's input
(scale, then per-channel mean/std), the square size and resize (interpolation, crop) it was trained or evaluated
at, the class names in label order and the LeakyReLU slope. A field that is None is unknown. The trainers write it
into every checkpoint (porting.runs.trainer_preprocessing), port-weights into every format it writes, and formats
that define one imply it (Darknet: RGB in [0, 1], slope 0.1; timm: its pretrained_cfg). Records from several places
about the same weights are combined with `combine`, which refuses any field on which two of them disagree.

Over 300 lines: the schema, its validation, the combination rule and the resize the record names are one contract.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from darknet_arch import DARKNET_LEAKY_SLOPE
from porting.errors import PortingError, parse_json, shown
from porting.state import check_leaky_slope

UINT8_RGB = "uint8 RGB"  # the only input the models take: 8-bit RGB images, channels last
PIXEL_SCALE = 1.0 / 255.0  # uint8 -> [0, 1]
# torchvision's / timm's ImageNet statistics (timm.data.constants.IMAGENET_DEFAULT_MEAN/STD).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Plain [0, 1] input after the scale: what Darknet's own weights take.
UNIT_MEAN, UNIT_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
# PIL's resampling filters under the names timm uses (timm.data.transforms).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
# timm's evaluation crops: "squash" resizes both sides to floor(size / crop_pct) (with crop_pct 1: the whole image
# to size x size, what our trainers do), "center" the shorter side, keeping the aspect ratio; then the central
# size x size. timm's third mode, "border" (pad instead of crop), is not supported.
CROP_MODES = ("center", "squash")
# Bounds on the numbers a record sizes images with: a file's number never sizes an allocation unchecked (an
# image_size of 100,000 asked an export for 112 GiB; a crop_pct of 0.001 resizes to 1,000x the input side first).
MAX_IMAGE_SIZE = 4096
MIN_CROP_PCT = 0.25
# Two recorded floats are the same value when they differ by less than this (JSON and text round-off).
FLOAT_RTOL = 1e-9


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What a set of weights expects as input, and the slope and class names it was trained with (None: unknown)."""

    input: str | None = None  # "uint8 RGB"
    scale: float | None = None  # multiplies the uint8 values: 1/255 gives [0, 1]
    mean: tuple[float, ...] | None = None  # per channel, subtracted after scaling; (0, 0, 0) with std 1: plain [0, 1]
    std: tuple[float, ...] | None = None
    image_size: int | None = None  # the square side trained (timm: evaluated) at
    interpolation: str | None = None  # one of INTERPOLATIONS
    crop_pct: float | None = None  # resize to floor(image_size / crop_pct), then crop the central image_size
    crop_mode: str | None = None  # one of CROP_MODES
    class_names: tuple[str, ...] | None = None  # in label order: class_names[i] is logit i
    leaky_slope: float | None = None

    def __post_init__(self) -> None:
        _validate(self, "preprocessing")

    @classmethod
    def from_json(cls, raw: Any, where: str, *, strict: bool = True) -> tuple[Preprocessing, list[str]]:
        """A record from its JSON form, and the unknown keys it had (an error if `strict`)."""
        if raw is None:
            return cls(), []
        if not isinstance(raw, Mapping):
            raise PortingError(f"{where}: a preprocessing record must be a JSON object, got {type(raw).__name__}")
        unknown = sorted(str(k) for k in raw if k not in FIELDS)
        if unknown and strict:
            raise PortingError(f"{where}: unknown preprocessing field(s) {unknown}; the fields are {', '.join(FIELDS)}")
        try:
            return cls(**{k: raw[k] for k in FIELDS if raw.get(k) is not None}), unknown
        except PortingError as exc:
            raise PortingError(f"{where}: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        """The known fields as JSON-ready values (tuples as lists), in FIELDS order."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items() if v is not None}

    def replace(self, **changes: Any) -> Preprocessing:
        return dataclasses.replace(self, **changes)

    def filled(self, defaults: Preprocessing) -> Preprocessing:
        """This record with its unknown fields taken from `defaults`."""
        return self.replace(**{k: getattr(defaults, k) for k in FIELDS if getattr(self, k) is None})

    def without(self, *keys: str) -> Preprocessing:
        """This record with `keys` unknown."""
        return self.replace(**dict.fromkeys(keys))

    def only(self, *keys: str) -> Preprocessing:
        """This record with every field but `keys` unknown."""
        return self.without(*(k for k in FIELDS if k not in keys))

    def known(self) -> tuple[str, ...]:
        """The fields this record gives."""
        return tuple(k for k in FIELDS if getattr(self, k) is not None)

    def describe(self) -> str:
        """One line for messages: 'uint8 RGB x 1/255, mean (...), std (...), 256 px bicubic center crop, ...'."""
        parts = []
        if self.scale is not None:
            inverse = 1.0 / self.scale
            exact = math.isclose(inverse, round(inverse), rel_tol=FLOAT_RTOL)
            scale = f"1/{round(inverse)}" if exact else f"{self.scale:g}"  # 1/255 rather than 0.00392157
            parts.append(f"{self.input or 'pixels'} x {scale}")
        if self.mean is not None or self.std is not None:
            parts.append(f"mean {self.mean}, std {self.std}")
        if self.image_size is not None:
            crop = self.crop_mode and f"{self.crop_mode} crop_pct {self.crop_pct}"
            parts.append(", ".join(p for p in (f"{self.image_size} px", self.interpolation, crop) if p))
        if self.class_names is not None:
            parts.append(f"{len(self.class_names)} class names")
        if self.leaky_slope is not None:
            parts.append(f"leaky_slope {self.leaky_slope}")
        return ", ".join(parts) or "nothing recorded"

    def check_against(self, num_classes: int | None, in_channels: int, where: str) -> None:
        """Refuse class names whose count differs from the head, and mean/std of another channel count."""
        if self.class_names is not None and len(self.class_names) != num_classes:
            head = "no classifier head" if num_classes is None else f"a {num_classes}-class head"
            raise PortingError(
                f"{where}: {len(self.class_names)} class names for {head}; give one name per logit, in label order"
            )
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and len(value) != in_channels:
                raise PortingError(f"{where}: {key} has {len(value)} values for {in_channels} input channels")

    def missing(self, keys: Sequence[str], what: str) -> PortingError:
        """The error naming the fields among `keys` this record does not give, needed for `what`."""
        unknown = [k for k in keys if getattr(self, k) is None]
        return PortingError(f"{what} needs {', '.join(unknown)}, which the weights do not record")

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB (..., H, W, C) -> float32 network input: pixels x scale, then (x - mean) / std per channel."""
        scale, mean, std = self.scale, self.mean, self.std
        if scale is None or mean is None or std is None:
            raise self.missing(("scale", "mean", "std"), "normalising pixels")
        x = np.asarray(pixels, np.float64) * scale
        return ((x - np.asarray(mean)) / np.asarray(std)).astype(np.float32)

    def resize(self, img: Any) -> Any:
        """A PIL image at image_size square, as timm's evaluation transform resizes it (PIL filter `interpolation`;
        "center": the shorter side to floor(image_size / crop_pct), "squash": both sides), then the central square.

        With crop_mode "squash" and crop_pct 1 (what the trainers record) that is the whole image resized.
        """
        from PIL import Image  # only here: the record itself is plain data

        size, interpolation, crop_pct = self.image_size, self.interpolation, self.crop_pct
        if size is None or interpolation is None or crop_pct is None or self.crop_mode is None:
            raise self.missing(RESIZE_FIELDS, "resizing an image")
        scaled = math.floor(size / crop_pct)
        w, h = img.size
        if self.crop_mode == "squash":
            new_w = new_h = scaled
        elif w <= h:
            new_w, new_h = scaled, int(scaled * h / w)
        else:
            new_w, new_h = int(scaled * w / h), scaled
        top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)  # torchvision's CenterCrop
        img = img.resize((new_w, new_h), Image.Resampling[interpolation.upper()])
        return img.crop((left, top, left + size, top + size))

    def prepare(self, image: Any) -> np.ndarray:
        """One image (PIL, or an HWC uint8 array) -> the (image_size, image_size, C) float32 input these weights
        expect: in RGB, `resize`d, then `normalize`d."""
        from PIL import Image

        img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
        return self.normalize(np.asarray(self.resize(img.convert("RGB"))))


# Every field, in the order records are written and described.
FIELDS = tuple(f.name for f in dataclasses.fields(Preprocessing))
# The fields a resize needs (Preprocessing.resize).
RESIZE_FIELDS = ("image_size", "interpolation", "crop_pct", "crop_mode")


def _finite_floats(value: Any, key: str, positive: bool = False) -> tuple[float, ...]:
    if isinstance(value, str | bytes | Mapping):  # iterable, but not a list of numbers
        raise PortingError(f"{key} must be a list of numbers, got {value!r}")
    try:
        floats = tuple(_number(v, key) for v in value)
    except TypeError:
        raise PortingError(f"{key} must be a list of numbers, got {value!r}") from None
    if not floats or (positive and min(floats) <= 0):
        raise PortingError(f"{key} must be a non-empty list of {'positive ' if positive else ''}numbers, got {value!r}")
    return floats


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PortingError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _validate(record: Preprocessing, where: str) -> None:
    """Check every given field's type and range, normalising numbers to floats and sequences to tuples."""
    set_ = object.__setattr__  # the dataclass is frozen; this runs once, in __post_init__
    if record.input is not None and record.input != UINT8_RGB:
        raise PortingError(f"{where}: input {record.input!r} is not supported; the models take {UINT8_RGB!r}")
    if record.scale is not None:
        set_(record, "scale", _number(record.scale, f"{where}: scale"))
        if record.scale <= 0:
            raise PortingError(f"{where}: scale must be positive (1/255 maps uint8 to [0, 1]), got {record.scale}")
    if record.mean is not None:
        set_(record, "mean", _finite_floats(record.mean, f"{where}: mean"))
    if record.std is not None:
        set_(record, "std", _finite_floats(record.std, f"{where}: std", positive=True))
    if record.image_size is not None and (isinstance(record.image_size, bool) or not isinstance(record.image_size, int)
                                          or not 1 <= record.image_size <= MAX_IMAGE_SIZE):  # fmt: skip
        raise PortingError(f"{where}: image_size must be an int in 1..{MAX_IMAGE_SIZE}, got {record.image_size!r}")
    if record.interpolation is not None and record.interpolation not in INTERPOLATIONS:
        raise PortingError(f"{where}: interpolation {record.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    if record.crop_pct is not None:
        set_(record, "crop_pct", _number(record.crop_pct, f"{where}: crop_pct"))
        if not MIN_CROP_PCT <= record.crop_pct <= 1:
            raise PortingError(f"{where}: crop_pct must be in [{MIN_CROP_PCT}, 1], got {record.crop_pct}")
    if record.crop_mode is not None and record.crop_mode not in CROP_MODES:
        raise PortingError(f"{where}: crop_mode {record.crop_mode!r} is not one of {', '.join(CROP_MODES)}")
    if record.class_names is not None:
        if not isinstance(record.class_names, list | tuple):  # a string would become one name per character
            raise PortingError(f"{where}: class_names must be a list of names, got {shown(record.class_names)}")
        names = tuple(record.class_names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise PortingError(f"{where}: class_names must be a non-empty list of non-empty strings")
        set_(record, "class_names", names)
    set_(record, "leaky_slope", check_leaky_slope(record.leaky_slope, f"{where}: leaky_slope"))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=FLOAT_RTOL)
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _shown(value: Any) -> str:
    if isinstance(value, tuple) and len(value) > 6:
        return f"[{len(value)} names: {', '.join(map(repr, value[:3]))}, ...]"
    return repr(list(value) if isinstance(value, tuple) else value)


def contradictions(records: Sequence[tuple[str, Preprocessing]]) -> list[str]:
    """'field: value (source) vs value (source)' for every field on which two of the named records disagree."""
    problems = []
    for key in FIELDS:
        given = [(name, getattr(r, key)) for name, r in records if getattr(r, key) is not None]
        for name, value in given[1:]:
            if not _same(given[0][1], value):
                problems.append(f"{key}: {_shown(given[0][1])} ({given[0][0]}) vs {_shown(value)} ({name})")
    return problems


def combine(records: Sequence[tuple[str, Preprocessing]], where: str) -> Preprocessing:
    """One record from several named ones about the same weights; PortingError listing every disagreement."""
    problems = contradictions(records)
    if problems:
        raise PortingError(f"{where}: contradictory preprocessing:\n  " + "\n  ".join(problems))
    values = {k: next((v for _, r in records if (v := getattr(r, k)) is not None), None) for k in FIELDS}
    return Preprocessing(**values)


def read_class_names(path: str | os.PathLike) -> tuple[str, ...]:
    """Class names from a text file, one per line in label order (like Darknet's `.names` files); trailing blank
    lines are ignored, other blank lines refused."""
    where = os.fspath(path)
    try:
        with open(where, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PortingError(f"cannot read class names from {where!r}: {exc}") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if not lines or blank:
        raise PortingError(f"{where}: expected one class name per line, in label order; blank line(s) {blank[:5]}")
    return tuple(line.strip() for line in lines)


def parse_preprocessing(text: str) -> Preprocessing:
    """--preprocessing: a JSON object of record fields, or the path of a file holding one."""
    where = "--preprocessing"
    if not text.lstrip().startswith("{"):
        where = text
        try:
            with open(text, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise PortingError(f"--preprocessing {where!r}: neither a JSON object nor a readable file ({exc})") from exc
    return Preprocessing.from_json(parse_json(text, where), where, strict=True)[0]


# What a Darknet .weights file implies (docs/darknet-weights.md): RGB in [0, 1], no mean or std, slope 0.1. It
# records no size, resize, or class names.
DARKNET = Preprocessing(input=UINT8_RGB, scale=PIXEL_SCALE, mean=UNIT_MEAN, std=UNIT_STD,
                        leaky_slope=DARKNET_LEAKY_SLOPE)  # fmt: skip
# The trainers' square input side on real data and accelerators (the competition's 256 px), and an export's when
# nothing records one; `--data demo` on a CPU uses train.data.DEMO_IMAGE_SIZE.
DEFAULT_IMAGE_SIZE = 256
# What our trainers' checkpoints imply where their record is silent (records written before a field existed): uint8
# RGB / 255, ImageNet mean/std, the whole image resized bilinearly (train.data.decode).
TRAINER_INTERPOLATION = "bilinear"  # the trainers' resize (train.data.decode), antialiased when shrinking
TRAINER_DEFAULTS = Preprocessing(input=UINT8_RGB, scale=PIXEL_SCALE, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                 interpolation=TRAINER_INTERPOLATION, crop_pct=1.0, crop_mode="squash")  # fmt: skip
# The fields a Darknet file can hold (by implication) and the ones it cannot.
DARKNET_HELD = ("input", "scale", "mean", "std", "leaky_slope")


# ------------------------------------------------------------------------------ any image mode -> 8-bit RGB
# The one conversion the trainers' decode (train.data.decode) and the serving runner (porting.serve_predict) share.

# Transparent pixels are composited onto white: the usual look of a transparent PNG in a viewer.
BACKGROUND_RGB = (255, 255, 255)
# 16-bit samples map to 8 bits by value / 257 (65535 -> 255, exact at both ends).
UINT16_TO_UINT8 = 257
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
CONVERT_BAND_PIXELS = 1 << 18  # pixels per band of a 16-bit conversion (2 MiB of int64)


def _sixteen_to_eight(img: Any) -> np.ndarray:
    """A 16-bit (or 32-bit integer) greyscale image as uint8, value / 257 rounded, a band of rows at a time.

    Integer arithmetic on bands of CONVERT_BAND_PIXELS: the peak is the uint8 result plus one band, not a
    float64 copy of the whole image (28 bytes per pixel: 4.7 GB for a 13,000 x 13,000 PNG of 329 KB).
    """
    width, height = img.size
    out = np.empty((height, width), np.uint8)
    rows = max(1, CONVERT_BAND_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        band = np.asarray(img.crop((0, top, width, min(top + rows, height))), dtype=np.int64)
        # round(v / 257) == (v + 128) // 257 for integers: 257 is odd, so v / 257 is never a tie.
        np.clip((band + UINT16_TO_UINT8 // 2) // UINT16_TO_UINT8, 0, 255, out=band)
        out[top : top + band.shape[0]] = band
    return out


def to_rgb(img: Any) -> Any:
    """Any Pillow mode -> 8-bit RGB: alpha composited on BACKGROUND_RGB, 16-bit scaled (not clipped) to 8."""
    from PIL import Image  # only here: the records above are plain data

    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in SIXTEEN_BIT_MODES:
        return Image.fromarray(_sixteen_to_eight(img), "L").convert("RGB")
    if img.mode == "F":  # float images: taken as already on the 0..255 scale
        return Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("LA", "La", "PA", "RGBa") or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, BACKGROUND_RGB)
        background.paste(img.convert("RGB"), mask=img.getchannel("A"))
        return background
    return img.convert("RGB")
