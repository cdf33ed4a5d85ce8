"""Dataset formats, labels, bad input and splits (train.data.formats, mask, splits)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_helpers import CLASS_COLOURS, colour_class, make_folder_dataset, make_mask_dataset, truncate, write_image
from PIL import Image

from train.data import DataError, load_eval_folder, load_splits, split_indices
from train.data.__main__ import main as cli_main
from train.data.decode import decode_image

# The competition's 18 classes written out by hand from docs/data.md's mask layout (not computed by a formula):
# (mask state of the file, gender, age) -> class.
EXPECTED_CLASS = {
    ("wear", "male", 29): 0, ("wear", "male", 30): 1, ("wear", "male", 60): 2,
    ("wear", "female", 18): 3, ("wear", "female", 59): 4, ("wear", "female", 85): 5,
    ("incorrect", "male", 29): 6, ("incorrect", "male", 30): 7, ("incorrect", "male", 60): 8,
    ("incorrect", "female", 18): 9, ("incorrect", "female", 59): 10, ("incorrect", "female", 85): 11,
    ("not_wear", "male", 29): 12, ("not_wear", "male", 30): 13, ("not_wear", "male", 60): 14,
    ("not_wear", "female", 18): 15, ("not_wear", "female", 59): 16, ("not_wear", "female", 85): 17,
}  # fmt: skip
STEM_STATE = {
    "mask1": "wear",
    "mask2": "wear",
    "mask3": "wear",
    "mask4": "wear",
    "mask5": "wear",
    "incorrect_mask": "incorrect",
    "normal": "not_wear",
}
PERSONS = [
    ("000001", "male", 29),
    ("000002", "male", 30),
    ("000003", "male", 60),
    ("000004", "female", 18),
    ("000005", "female", 59),
    ("000006", "female", 85),
]


def test_label_formula_gives_all_18_classes_from_folder_names(tmp_path: Path) -> None:
    make_mask_dataset(tmp_path, PERSONS)
    splits = load_splits(tmp_path, val_fraction=0.0)
    assert splits.format == "mask" and len(splits.class_names) == 18 and len(splits.train) == 42
    seen = set()
    for path, label in zip(splits.train.paths, splits.train.labels, strict=True):
        p = Path(path)
        _, gender, _, age = p.parent.name.split("_")
        expected = EXPECTED_CLASS[(STEM_STATE[p.stem], gender, int(age))]
        assert label == expected, path
        seen.add(expected)
    assert seen == set(range(18))


def test_train_csv_gives_labels_and_unlisted_folders_are_skipped(tmp_path: Path) -> None:
    make_mask_dataset(tmp_path, PERSONS)
    # The CSV's gender/age win over the folder name: person 000001 is listed as a 61-year-old woman.
    rows = ["id,gender,race,age,path", "000001,female,Asian,61,000001_male_Asian_29"]
    rows += [f"{pid},{g},Asian,{a},{pid}_{g}_Asian_{a}" for pid, g, a in PERSONS[1:5]]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    splits = load_splits(tmp_path, val_fraction=0.0, allow_empty_classes=True)
    labels = {
        (Path(p).parent.name, Path(p).stem): int(lbl)
        for p, lbl in zip(splits.train.paths, splits.train.labels, strict=True)
    }
    assert labels[("000001_male_Asian_29", "normal")] == EXPECTED_CLASS[("not_wear", "female", 85)]
    assert len(splits.train) == 35
    assert [Path(p).name for p, _ in splits.skipped] == ["000006_female_Asian_85"]


def test_unparseable_person_folders_are_reported_by_name(tmp_path: Path) -> None:
    make_mask_dataset(tmp_path, PERSONS[:1])
    (tmp_path / "images" / "bob_smith").mkdir()
    (tmp_path / "images" / "000009_robot_Asian_20").mkdir()
    with pytest.raises(DataError, match=r"bob_smith.*000009_robot_Asian_20|000009_robot_Asian_20.*bob_smith"):
        load_splits(tmp_path, allow_empty_classes=True)


def test_missing_empty_and_imageless_paths_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_splits(tmp_path / "nope")
    with pytest.raises(DataError, match="no dataset found"):
        load_splits(tmp_path)
    (tmp_path / "cls" / "sub").mkdir(parents=True)
    (tmp_path / "cls" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="empty class folder"):
        load_splits(tmp_path)
    with pytest.raises(DataError, match="no images found"):
        load_splits(tmp_path, allow_empty_classes=True)


def test_image_folder_classes_are_sorted_and_empty_class_needs_allowing(tmp_path: Path) -> None:
    make_folder_dataset(tmp_path, {"zebra": 3, "apple": 2, "mango": 2})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty class folder"):
        load_splits(tmp_path)
    splits = load_splits(tmp_path, val_fraction=0.0, allow_empty_classes=True)
    assert splits.class_names == ("apple", "empty", "mango", "zebra")
    for path, label in zip(splits.train.paths, splits.train.labels, strict=True):
        assert splits.class_names[label] == Path(path).parent.name


def test_bad_files_are_skipped_with_reasons_and_never_shift_labels(tmp_path: Path) -> None:
    make_folder_dataset(tmp_path, {"a": 6, "b": 6, "c": 6})
    (tmp_path / "a" / "zero.jpg").write_bytes(b"")
    truncate(write_image(tmp_path / "b" / "cut.jpg", (0, 0, 0), size=(64, 64)))
    (tmp_path / "c" / "text.jpg").write_text("this is not a JPEG")
    splits = load_splits(tmp_path, val_fraction=0.0, max_bad_fraction=0.2)
    reasons = {Path(p).name: r for p, r in splits.skipped}
    assert set(reasons) == {"zero.jpg", "cut.jpg", "text.jpg"}
    assert (
        "0 bytes" in reasons["zero.jpg"]
        and "truncated" in reasons["cut.jpg"].lower()
        and "not an image" in reasons["text.jpg"]
    )
    assert len(splits.train) == 18
    for path, label in zip(splits.train.paths, splits.train.labels, strict=True):
        assert colour_class(decode_image(path, 8)) == label, path


def test_more_bad_files_than_allowed_aborts_with_the_list(tmp_path: Path) -> None:
    make_folder_dataset(tmp_path, {"a": 50, "b": 49})
    (tmp_path / "b" / "zero.jpg").write_bytes(b"")
    load_splits(tmp_path)  # 1 of 100 = 1%: allowed
    (tmp_path / "a" / "zero2.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"(?s)2 of 101.*(zero\.jpg.*zero2\.jpg|zero2\.jpg.*zero\.jpg)"):
        load_splits(tmp_path)


def test_decompression_bombs_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_folder_dataset(tmp_path, {"a": 2, "b": 2})
    Image.new("L", (100, 100)).save(tmp_path / "a" / "bomb.png")
    # Pillow refuses images over 2 * MAX_IMAGE_PIXELS; a low limit makes a small file act as a bomb.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    splits = load_splits(tmp_path, val_fraction=0.0, max_bad_fraction=0.5)
    assert [(Path(p).name, "decompression bomb" in r) for p, r in splits.skipped] == [("bomb.png", True)]


def test_csv_format_with_names_ranges_unknowns_and_duplicates(tmp_path: Path) -> None:
    for i in range(4):
        write_image(tmp_path / "img" / f"{i}.jpg", CLASS_COLOURS[i % 2])
    csv = tmp_path / "data.csv"
    csv.write_text("path,label,group\nimg/0.jpg,cat,g1\nimg/1.jpg,dog,g1\nimg/2.jpg,cat,g2\nimg/3.jpg,dog,g2\n")
    splits = load_splits(csv, val_fraction=0.5)
    assert splits.format == "csv" and splits.class_names == ("cat", "dog")
    assert set(splits.train.groups).isdisjoint(splits.val.groups) and len(splits.val) == 2
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    csv.write_text("path,label\nimg/0.jpg,0\nimg/1.jpg,2\nimg/2.jpg,1\n")
    with pytest.raises(DataError, match=r"out of range 0\.\.1 on row\(s\) 3"):
        load_splits(csv)
    csv.write_text("path,label\nimg/0.jpg,cat\nimg/1.jpg,bird\n")
    with pytest.raises(DataError, match=r"not in classes\.txt.*row\(s\) 3"):
        load_splits(csv)
    csv.write_text("path,label\nimg/0.jpg,cat\nimg/1.jpg,dog\n./img/0.jpg,dog\n")
    with pytest.raises(DataError, match=r"duplicate paths.*rows 2 and 4"):
        load_splits(csv)
    csv.write_text("file,label\nimg/0.jpg,cat\n")
    with pytest.raises(DataError, match="missing column"):
        load_splits(csv)


def test_grouped_split_has_no_person_on_both_sides_and_is_stratified(tmp_path: Path) -> None:
    persons = [(f"{i:06d}", "male" if i % 2 else "female", 20 + 20 * (i % 3)) for i in range(30)]
    make_mask_dataset(tmp_path, persons)
    a = load_splits(tmp_path, val_fraction=0.2, seed=3)
    assert set(a.train.groups).isdisjoint(a.val.groups)
    assert len(set(a.val.groups)) == 6 and len(a.val) == 42
    # 5 persons in each (gender, age) stratum: exactly one of each goes to validation.
    val_strata = sorted({int(lbl) % 6 for lbl in a.val.labels})
    assert val_strata == [0, 1, 2, 3, 4, 5]
    b = load_splits(tmp_path, val_fraction=0.2, seed=3)
    assert a.val.paths == b.val.paths
    c = load_splits(tmp_path, val_fraction=0.2, seed=4)
    assert a.val.paths != c.val.paths


def test_split_indices_partition_every_record() -> None:
    from train.data import Records

    groups = [f"g{i // 3}" for i in range(60)]
    records = Records(tuple(f"/x/{i}.jpg" for i in range(60)), np.arange(60) // 3 % 4, tuple(groups))
    train, val = split_indices(records, 0.25, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(60))
    assert {groups[i] for i in train}.isdisjoint({groups[i] for i in val}) and len(val) == 15


def test_explicit_val_path_maps_classes_by_name(tmp_path: Path) -> None:
    make_folder_dataset(tmp_path / "tr", {"a": 2, "b": 2, "c": 2})
    make_folder_dataset(tmp_path / "va", {"c": 1})
    splits = load_splits(tmp_path / "tr", val_path=tmp_path / "va")
    assert len(splits.train) == 6 and splits.val.labels.tolist() == [2]
    make_folder_dataset(tmp_path / "vb", {"d": 1})
    with pytest.raises(DataError, match="classes not in the training data: d"):
        load_splits(tmp_path / "tr", val_path=tmp_path / "vb")


def test_eval_folder_keeps_info_csv_order(tmp_path: Path) -> None:
    ids = ["c.jpg", "a.jpg", "b.jpg"]
    for k, name in enumerate(ids):
        write_image(tmp_path / "images" / name, CLASS_COLOURS[k])
    (tmp_path / "info.csv").write_text("ImageID,ans\n" + "".join(f"{i},0\n" for i in ids))
    records = load_eval_folder(tmp_path)
    assert [Path(p).name for p in records.paths] == ids and records.labels.tolist() == [-1, -1, -1]
    (tmp_path / "images" / "b.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"row 4 .*b\.jpg: empty file"):
        load_eval_folder(tmp_path)


def test_cli_prints_summary_and_fails_on_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_folder_dataset(tmp_path / "d", {"a": 5, "b": 5})
    assert cli_main([str(tmp_path / "d"), "--json", "--val-fraction", "0.4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "folder" and summary["split_sizes"] == {"train": 6, "val": 4}
    assert [c["train"] + c["val"] for c in summary["classes"]] == [5, 5]
    assert cli_main([str(tmp_path / "d")]) == 0
    assert "format: folder" in capsys.readouterr().out
    assert cli_main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
