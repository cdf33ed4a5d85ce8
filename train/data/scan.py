"""The load-time check of every image file: readable, a known image format, not truncated, not a bomb.

Checking at load time (not while training) keeps labels aligned and batch shapes fixed: a bad file never
reaches the pipeline, so nothing has to be dropped or replaced mid-epoch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# libjpeg's smallest DCT scale: the whole entropy-coded stream is still read (so truncation is found),
# at a fraction of a full decode's cost.
_JPEG_CHECK_SCALE = 8
_SCAN_THREADS = 8  # file reads and decodes release the GIL


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def check_image_file(path: str) -> str | None:
    """None when `path` decodes; else the reason it cannot be used."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft(None, (max(1, img.width // _JPEG_CHECK_SCALE), max(1, img.height // _JPEG_CHECK_SCALE)))
            img.load()
    except FileNotFoundError:
        return "file not found"
    except UnidentifiedImageError:
        return "not an image (unrecognised file content)"
    except Image.DecompressionBombError as e:
        return f"decompression bomb refused: {e}"
    except (OSError, ValueError, SyntaxError) as e:
        return f"unreadable image (corrupt or truncated): {e}"
    return None


def check_image_files(paths: Sequence[str]) -> list[str | None]:
    """check_image_file for each path, in order (threaded)."""
    if len(paths) < 2 * _SCAN_THREADS:
        return [check_image_file(p) for p in paths]
    with ThreadPoolExecutor(_SCAN_THREADS) as pool:
        return list(pool.map(check_image_file, paths, chunksize=16))
