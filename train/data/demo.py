"""A generated 18-class dataset in the mask-competition layout, learnable from the pixels.

Each person is a cartoon face with a fixed identity (skin, hair colour, face shape, background) drawn seven
times (mask1..5, incorrect_mask, normal) with jitter, random mask colours, pixel noise and JPEG artefacts.
The class traits are visible shapes:
- mask state: worn = a mask over nose, mouth and chin; incorrect = a mask pulled down over the chin and neck
  (nose and mouth show); not worn = no mask. Mask colours always stand out from the skin;
- gender: female = long hair falling past the chin on both sides; male = short hair on the crown only;
- age band: < 30 = coloured hair; 30..59 = coloured hair and dark glasses; >= 60 = grey or white hair.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .checks import DataError
from .formats import AGE_BANDS, GENDERS, MASK_FILE_STEMS

# Recommended training size on a CPU: Darknet-53 costs 18.6 GFLOP forward at 256 px and ~0.29 at 32 px.
DEMO_IMAGE_SIZE = 32
# Written JPEG height in px; width is 3/4 of it, the aspect of the competition's 384x512 photos.
DEMO_FILE_HEIGHT = 64
# JPEG height per training px: the competition's 512 px photos train at 256 px (GPU demo: 512x384 JPEGs).
DEMO_FILE_OVERSAMPLE = 2
DEMO_PERSONS_PER_CLASS = 48  # persons per (gender, age band); each gives 5 worn + 1 incorrect + 1 bare image
DEMO_VERSION = 4  # bump when the drawing changes, so cached copies are regenerated
DEMO_MARKER = "demo.json"  # written last: its presence with matching parameters marks a complete copy
_SUPERSAMPLE = 2  # drawn at twice the size and reduced, for antialiased edges
_NOISE_STD = 6.0  # pixel noise, in 8-bit levels
_JPEG_QUALITY = (80, 95)
_MIN_CONTRAST = 90.0  # RGB distance between the background and the hair or skin
_BACKGROUND_ATTEMPTS = 20
_AGES = ((18, 29), (30, 59), (60, 80))  # ages drawn per band (the band limits are in formats.AGE_BANDS)
_RACES = ("Asian", "White", "Black", "Hispanic")
_MASK_COLOURS = ((245, 245, 245), (150, 190, 235), (30, 30, 35), (240, 170, 190), (120, 120, 125), (60, 90, 160))
_SKIN_TONES = ((255, 220, 190), (240, 200, 160), (210, 160, 120), (170, 120, 80), (120, 80, 55))
_HAIR_COLOURED = ((25, 20, 15), (60, 40, 25), (95, 60, 35), (130, 55, 30))  # dark: far from the grey of age >= 60


def default_cache_dir() -> Path:
    """$DARKNET53_DATA_CACHE, else ~/.cache/darknet53-jax."""
    env = os.environ.get("DARKNET53_DATA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "darknet53-jax"


def demo_file_height(train_size: int) -> int:
    """The JPEG height to generate for training at `train_size` px: twice that, and at least DEMO_FILE_HEIGHT."""
    return max(DEMO_FILE_HEIGHT, DEMO_FILE_OVERSAMPLE * train_size)


def _jitter(rng: np.random.Generator, scale: float) -> float:
    return float(rng.uniform(-scale, scale))


def _contrasting_colour(rng: np.random.Generator, avoid: tuple[tuple[int, int, int], ...]) -> tuple[int, int, int]:
    # A background far from hair and skin, so the hair outline (the gender trait) stays visible; saturated, so
    # grey hair stays distinguishable from it.
    for _ in range(_BACKGROUND_ATTEMPTS):
        r, g, b = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.35, 0.8), rng.uniform(0.35, 0.9))
        colour = (int(r * 255), int(g * 255), int(b * 255))
        if all(math.dist(colour, c) >= _MIN_CONTRAST for c in avoid):
            break
    return colour


def _mask_colour(rng: np.random.Generator, skin: tuple[int, int, int]) -> tuple[int, int, int]:
    # A mask the colour of the skin would make "incorrect" (a mask on the chin) look like "not worn".
    choices = [c for c in _MASK_COLOURS if math.dist(c, skin) >= _MIN_CONTRAST]
    return choices[int(rng.integers(len(choices)))]


def _identity(rng: np.random.Generator, age_band: int) -> dict:
    if age_band == 2:
        grey = int(rng.integers(180, 240))
        hair = (grey, grey, grey + int(rng.integers(0, 15)))
    else:
        hair = _HAIR_COLOURED[int(rng.integers(len(_HAIR_COLOURED)))]
    skin = _SKIN_TONES[int(rng.integers(len(_SKIN_TONES)))]
    return {
        "skin": skin,
        "hair": hair,
        "background": _contrasting_colour(rng, (hair, skin)),
        "cx": 0.5 + _jitter(rng, 0.05),
        "cy": 0.53 + _jitter(rng, 0.04),
        "rx": 0.30 + _jitter(rng, 0.03),
        "ry": 0.31 + _jitter(rng, 0.03),
        "glasses": (int(rng.integers(0, 40)),) * 3,
    }


def draw_face(
    rng: np.random.Generator, ident: dict, *, mask_state: int, female: bool, age_band: int, height: int
) -> Image.Image:
    """One noisy RGB image (height x 3/4 height) of the person `ident` in `mask_state` (0 worn, 1 incorrect, 2 none)."""
    big_h = height * _SUPERSAMPLE
    big_w = big_h * 3 // 4
    img = Image.new("RGB", (big_w, big_h), ident["background"])
    d = ImageDraw.Draw(img)
    cx = (ident["cx"] + _jitter(rng, 0.04)) * big_w
    cy = (ident["cy"] + _jitter(rng, 0.03)) * big_h
    rx, ry = ident["rx"] * big_w, ident["ry"] * big_h

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return (cx + x0 * rx, cy + y0 * ry, cx + x1 * rx, cy + y1 * ry)

    if female:  # long hair behind the face, past the chin on both sides
        d.rounded_rectangle(box(-1.35, -1.2, 1.35, 1.55), radius=rx * 0.6, fill=ident["hair"])
    d.ellipse(box(-1.0, -1.0, 1.0, 1.0), fill=ident["skin"])
    d.chord(box(-1.08, -1.2, 1.08, 0.2), 180, 360, fill=ident["hair"])  # crown hair, both genders
    for side in (-1, 1):  # eyes
        d.ellipse(box(side * 0.45 - 0.13, -0.22, side * 0.45 + 0.13, -0.06), fill=(20, 20, 30))
    if age_band == 1:  # dark glasses across the eyes
        d.rectangle(box(-0.95, -0.34, 0.95, 0.0), fill=ident["glasses"])
    d.polygon(
        [(cx, cy + 0.0 * ry), (cx - 0.15 * rx, cy + 0.28 * ry), (cx + 0.15 * rx, cy + 0.28 * ry)],
        fill=tuple(int(c * 0.8) for c in ident["skin"]),
    )  # nose
    d.ellipse(box(-0.35, 0.42, 0.35, 0.6), fill=(190, 40, 50))  # mouth
    mask_colour = _mask_colour(rng, ident["skin"])
    if mask_state == 0:  # worn: nose, mouth and chin covered
        d.rounded_rectangle(box(-0.95, -0.05, 0.95, 0.95), radius=rx * 0.25, fill=mask_colour)
    elif mask_state == 1:  # incorrect: pulled down below the mouth, over the chin and the neck
        d.rounded_rectangle(box(-0.9, 0.66, 0.9, 1.3), radius=rx * 0.15, fill=mask_colour)
    if mask_state in (0, 1):
        strap_y = -0.05 if mask_state == 0 else 0.75
        d.line(
            [box(-0.95, strap_y, -1.2, strap_y - 0.3)[:2], box(0.95, strap_y, 1.2, strap_y - 0.3)[:2]],
            fill=mask_colour,
            width=max(1, big_h // 64),
        )
    small = np.asarray(img.resize((big_w // _SUPERSAMPLE, height), Image.Resampling.BOX), dtype=np.float64)
    small = small + rng.normal(0.0, _NOISE_STD, small.shape)
    return Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8), "RGB")


def _is_complete(folder: Path, params: dict) -> bool:
    marker = folder / DEMO_MARKER
    try:
        return json.loads(marker.read_text()) == params
    except (OSError, ValueError):
        return False


def generate_demo_dataset(
    root: str | os.PathLike,
    *,
    persons_per_class: int = DEMO_PERSONS_PER_CLASS,
    image_size: int = DEMO_FILE_HEIGHT,
    seed: int = 0,
) -> Path:
    """Write the demo dataset (mask layout: images/<person>/*.jpg + train.csv) under `root`; returns its folder.

    Idempotent: an existing complete copy with the same parameters is reused; a new one is written to a
    temporary folder and renamed into place, so an interrupted run leaves nothing half-written.
    `image_size` is the JPEG height (width = 3/4 of it). persons_per_class counts persons per (gender, age band).
    """
    if persons_per_class < 1 or image_size < 16:
        raise DataError(
            f"demo: need persons_per_class >= 1 and image_size >= 16, got {persons_per_class}, {image_size}"
        )
    params = {"version": DEMO_VERSION, "persons_per_class": persons_per_class, "image_size": image_size, "seed": seed}
    target = Path(root) / f"demo-v{DEMO_VERSION}-p{persons_per_class}-h{image_size}-s{seed}"
    if _is_complete(target, params):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-tmp-", dir=target.parent))
    try:
        _write_demo(tmp, params)
        (tmp / DEMO_MARKER).write_text(json.dumps(params))
        if target.exists() and not _is_complete(target, params):  # an old or interrupted copy
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:  # another process renamed its identical copy into place first
            if not _is_complete(target, params):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_demo(folder: Path, params: dict) -> None:
    rng = np.random.default_rng([params["seed"], DEMO_VERSION])
    rows = ["id,gender,race,age,path"]
    person = 0
    for female in (False, True):
        for band, (lo, hi) in enumerate(_AGES):
            assert AGE_BANDS[band] <= lo  # the drawn ages must fall inside the band the formula uses
            for _ in range(params["persons_per_class"]):
                person += 1
                gender = GENDERS[int(female)]
                race = _RACES[int(rng.integers(len(_RACES)))]
                age = int(rng.integers(lo, hi + 1))
                name = f"{person:06d}_{gender}_{race}_{age}"
                (folder / "images" / name).mkdir(parents=True)
                ident = _identity(rng, band)
                for stem, mask_state in MASK_FILE_STEMS.items():
                    img = draw_face(
                        rng, ident, mask_state=mask_state, female=female, age_band=band, height=params["image_size"]
                    )
                    quality = int(rng.integers(_JPEG_QUALITY[0], _JPEG_QUALITY[1] + 1))
                    img.save(folder / "images" / name / f"{stem}.jpg", quality=quality)
                rows.append(f"{person:06d},{gender},{race},{age},{name}")
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
