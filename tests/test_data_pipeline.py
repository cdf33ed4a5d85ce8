"""Train and eval iterators: shapes, determinism, epochs, resumable state, process slices, eval coverage."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from data_helpers import colour_class, make_folder_dataset

from train.data import DataError, load_splits, make_eval_iter, make_train_iter

SIZE = 16


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory):
    root = make_folder_dataset(tmp_path_factory.mktemp("pipe"), {"a": 9, "b": 8, "c": 7}, size=(12, 16))
    return load_splits(root, val_fraction=0.0).train  # 24 records, labels 0..2


def take(it, n: int) -> list[dict]:
    return [{k: v.copy() for k, v in b.items()} for b in itertools.islice(it, n)]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


def test_train_batches_have_fixed_shape_and_labels_match_pixels(records) -> None:
    it = make_train_iter(records, batch_size=5, image_size=SIZE, seed=0)
    assert it.steps_per_epoch == 4  # 24 // 5, the remainder is dropped
    for batch in take(it, 6):
        assert batch["image"].shape == (5, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (5,) and batch["label"].dtype == np.int32
        assert [colour_class(img) for img in batch["image"]] == batch["label"].tolist()


def test_same_seed_same_batches_and_each_epoch_a_new_order(records) -> None:
    a = take(make_train_iter(records, batch_size=6, image_size=SIZE, seed=1, augment=False), 8)
    b = take(make_train_iter(records, batch_size=6, image_size=SIZE, seed=1, augment=False), 8)
    c = take(make_train_iter(records, batch_size=6, image_size=SIZE, seed=2, augment=False), 8)
    assert same(a, b) and not same(a, c)
    epoch0, epoch1 = a[:4], a[4:]
    assert not same(epoch0, epoch1)
    # Without augmentation an image identifies its record: each epoch shows every record once.
    for epoch in (epoch0, epoch1):
        images = np.concatenate([x["image"] for x in epoch])
        assert len({img.tobytes() for img in images}) == 24
    aug_a = take(make_train_iter(records, batch_size=6, image_size=SIZE, seed=1), 2)
    aug_b = take(make_train_iter(records, batch_size=6, image_size=SIZE, seed=1), 2)
    assert same(aug_a, aug_b)


def test_restoring_state_mid_epoch_yields_exactly_the_remaining_batches(records) -> None:
    reference = take(make_train_iter(records, batch_size=5, image_size=SIZE, seed=7), 7)
    it = make_train_iter(records, batch_size=5, image_size=SIZE, seed=7)
    take(it, 2)
    state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as a checkpoint stores it
    take(it, 3)  # the run went on past the checkpoint and was then interrupted
    fresh = make_train_iter(records, batch_size=5, image_size=SIZE, seed=7)
    fresh.set_state(state)
    assert same(take(fresh, 5), reference[2:])
    it.set_state(state)
    assert same(take(it, 5), reference[2:])


def test_state_from_another_configuration_is_refused(records) -> None:
    state = make_train_iter(records, batch_size=5, image_size=SIZE, seed=7).get_state()
    with pytest.raises(DataError, match="seed"):
        make_train_iter(records, batch_size=5, image_size=SIZE, seed=8).set_state(state)
    with pytest.raises(DataError, match="records"):
        make_train_iter(records.subset(range(20)), batch_size=5, image_size=SIZE, seed=7).set_state(state)


def test_processes_see_disjoint_slices_that_cover_the_global_batch(records) -> None:
    single = take(make_train_iter(records, batch_size=6, image_size=SIZE, seed=3, augment=False), 4)
    parts = [
        take(
            make_train_iter(
                records, batch_size=3, image_size=SIZE, seed=3, augment=False, process_index=p, process_count=2
            ),
            2,
        )
        for p in range(2)
    ]
    for step in range(2):
        imgs = [parts[p][step]["image"] for p in range(2)]
        a, b = ({x.tobytes() for x in i} for i in imgs)
        assert a.isdisjoint(b)
        assert np.array_equal(np.concatenate(imgs), single[step]["image"])  # global batch = process slices in order


def test_eval_covers_every_record_once_with_padding_masked(records) -> None:
    expected = sorted(
        colour_class(x)
        for x in np.concatenate([b["image"] for b in make_eval_iter(records, batch_size=24, image_size=SIZE)])
    )
    seen, lengths = [], []
    for p in range(3):
        batches = list(make_eval_iter(records, batch_size=5, image_size=SIZE, process_index=p, process_count=3))
        lengths.append(len(batches))
        for b in batches:
            assert b["image"].shape == (5, SIZE, SIZE, 3) and b["mask"].dtype == np.bool_
            assert not b["image"][~b["mask"]].any()
            seen += [
                (colour_class(img), int(lbl))
                for img, lbl in zip(b["image"][b["mask"]], b["label"][b["mask"]], strict=True)
            ]
    assert lengths == [2, 2, 2]  # ceil(24 / 15): the same on every process
    assert len(seen) == 24 and all(c == lbl for c, lbl in seen)
    assert sorted(c for c, _ in seen) == expected == sorted(records.labels.tolist())


def test_too_few_records_for_a_batch_is_an_error(records) -> None:
    with pytest.raises(DataError, match="at least one full batch"):
        make_train_iter(records, batch_size=13, image_size=SIZE, seed=0, process_count=2)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_a_portable_state(records) -> None:
    reference = take(make_train_iter(records, batch_size=4, image_size=SIZE, seed=5), 5)
    it = make_train_iter(records, batch_size=4, image_size=SIZE, seed=5, num_workers=2)
    try:
        assert same(take(it, 3), reference[:3])
        state = it.get_state()
    finally:
        it.close()
    resumed = make_train_iter(records, batch_size=4, image_size=SIZE, seed=5)  # no workers: the state still fits
    resumed.set_state(state)
    assert same(take(resumed, 2), reference[3:])


def test_demo_like_split_feeds_the_pipeline(tmp_path: Path) -> None:
    from data_helpers import make_mask_dataset

    make_mask_dataset(tmp_path, [(f"{i:06d}", "female" if i % 2 else "male", 25 + 20 * (i % 3)) for i in range(6)])
    splits = load_splits(tmp_path, val_fraction=0.5, allow_empty_classes=True)
    batch = next(make_train_iter(splits.train, batch_size=7, image_size=32, seed=0))
    assert [colour_class(img) for img in batch["image"]] == batch["label"].tolist()
