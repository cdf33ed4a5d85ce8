"""The demo dataset: generated as real JPEGs in the mask layout, idempotent, summarised, loaded by "demo"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from train.data import DEMO_IMAGE_SIZE, demo_file_height, generate_demo_dataset, load_splits, make_train_iter
from train.data.__main__ import main as cli_main
from train.data.demo import DEMO_FILE_HEIGHT
from train.options import DEFAULT_IMAGE_SIZE, default_image_size


def test_demo_is_generated_in_the_mask_layout_and_summarised(tmp_path: Path) -> None:
    root = generate_demo_dataset(tmp_path, persons_per_class=2, image_size=32, seed=1)
    persons = sorted(p.name for p in (root / "images").iterdir())
    assert len(persons) == 12 and all(len(list((root / "images" / p).glob("*.jpg"))) == 7 for p in persons)
    mtime = (root / "images" / persons[0] / "mask1.jpg").stat().st_mtime_ns
    assert generate_demo_dataset(tmp_path, persons_per_class=2, image_size=32, seed=1) == root
    assert (root / "images" / persons[0] / "mask1.jpg").stat().st_mtime_ns == mtime  # reused, not rewritten
    summary = load_splits(root, val_fraction=0.25).summary()
    assert summary["format"] == "mask" and summary["num_classes"] == 18
    assert all(c["train"] + c["val"] == (10 if c["index"] < 6 else 2) for c in summary["classes"])
    assert summary["groups"] == {"train": 9, "val": 3} and summary["skipped"] == []


def test_demo_path_uses_the_cache_folder_and_feeds_the_pipeline(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DARKNET53_DATA_CACHE", str(tmp_path))
    splits = load_splits("demo")
    assert Path(splits.root).is_relative_to(tmp_path)
    assert set(splits.train.groups).isdisjoint(splits.val.groups)
    batch = next(make_train_iter(splits.train, batch_size=8, image_size=DEMO_IMAGE_SIZE, seed=0))
    assert batch["image"].shape == (8, DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE, 3) and batch["image"].std() > 10
    assert cli_main(["demo"]) == 0
    assert "format: mask" in capsys.readouterr().out


@pytest.mark.parametrize("seed", [0, 1])
def test_demo_images_differ_between_persons_and_seeds(tmp_path: Path, seed: int) -> None:
    a = generate_demo_dataset(tmp_path / "a", persons_per_class=1, image_size=32, seed=seed)
    b = generate_demo_dataset(tmp_path / "b", persons_per_class=1, image_size=32, seed=seed + 10)
    files_a = sorted((a / "images").rglob("*.jpg"))
    files_b = sorted((b / "images").rglob("*.jpg"))
    assert len(files_a) == len(files_b) == 42
    assert files_a[0].read_bytes() != files_b[0].read_bytes()
    assert len({np.asarray(f.read_bytes()).tobytes() for f in files_a}) == 42


def test_demo_for_full_size_training_is_drawn_at_the_competitions_photo_size(tmp_path: Path, monkeypatch) -> None:
    # A GPU run trains the demo at 256 px: its JPEGs are then 384x512 (w x h), like the competition's photos.
    from PIL import Image

    import train.data.splits as splits_module

    generate = splits_module.generate_demo_dataset
    monkeypatch.setenv("DARKNET53_DATA_CACHE", str(tmp_path))
    monkeypatch.setattr(
        splits_module, "generate_demo_dataset", lambda root, **kw: generate(root, persons_per_class=1, **kw)
    )
    assert demo_file_height(DEMO_IMAGE_SIZE) == DEMO_FILE_HEIGHT
    small = load_splits("demo")
    large = load_splits("demo", demo_image_size=256)
    assert small.root != large.root
    with Image.open(small.train.paths[0]) as s, Image.open(large.train.paths[0]) as g:
        assert s.size == (DEMO_FILE_HEIGHT * 3 // 4, DEMO_FILE_HEIGHT) and g.size == (384, 512)


def test_default_image_size_is_the_demos_on_cpu_and_full_size_on_accelerators() -> None:
    assert default_image_size("demo", accelerator=False) == DEMO_IMAGE_SIZE
    assert default_image_size("demo", accelerator=True) == DEFAULT_IMAGE_SIZE == 256
    assert default_image_size("/data/mask", accelerator=False) == DEFAULT_IMAGE_SIZE
