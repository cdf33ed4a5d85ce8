"""Hostile and careless dataset input (issue 12): refused with a DataError naming the input, never a traceback,
never memory sized by a number in the file, never a file outside the data root, never an image counted twice."""

from __future__ import annotations

import io
import os
import resource
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from data_helpers import CLASS_COLOURS, make_folder_dataset, make_mask_dataset, write_image
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from train.data import DataError, load_eval_folder, load_splits
from train.data.__main__ import main as cli_main
from train.data.formats import MAX_AGE, parse_person_folder

# A generous per-example deadline: long enough for a loaded CI machine, short enough to catch a hang.
SETTINGS = settings(max_examples=40, deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Address-space cap for the CLI subprocess: the imports need ~0.55 GB; the old code's 10^11-class list would
# need terabytes, so it dies here (MemoryError) instead of taking the machine down.
CLI_ADDRESS_SPACE = 2 * 1024**3
# Loading a small hostile CSV traces well under this; the old code's label-sized class list traced gigabytes.
SMALL_INPUT_PEAK_BYTES = 4 * 1024**2
ROOT_IMAGES = ("a.jpg", "b.png", "c.jpg", "d.png", "sub/e.jpg", "sub/f.jpg")  # real images beside the fuzzed CSV


def _peak_bytes(fn) -> tuple[object, BaseException | None, int]:
    """(fn()'s result or None, the exception it raised or None, peak traced bytes)."""
    result, error = None, None
    tracemalloc.start()
    try:
        result = fn()
    except Exception as e:
        error = e
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return result, error, peak


def _one_paragraph(message: str) -> None:
    assert "\n" not in message.strip() and "Traceback" not in message, message


# --- Row 1: a mistyped integer label -------------------------------------------------------------------------


def _integer_csv(root: Path, labels: list[str]) -> Path:
    for i in range(len(labels)):
        write_image(root / f"{i}.jpg", CLASS_COLOURS[i % len(CLASS_COLOURS)])
    csv = root / "data.csv"
    csv.write_text("path,label\n" + "".join(f"{i}.jpg,{lbl}\n" for i, lbl in enumerate(labels)))
    return csv


def test_mistyped_huge_label_exits_2_naming_row_and_value_without_a_traceback(tmp_path: Path) -> None:
    csv = _integer_csv(tmp_path, ["0", "1", "99999999999", "1"])

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CLI_ADDRESS_SPACE, CLI_ADDRESS_SPACE))

    proc = subprocess.run(
        [sys.executable, "-m", "train.data", str(csv)],
        capture_output=True,
        text=True,
        preexec_fn=cap_memory,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    _one_paragraph(proc.stderr)
    assert "data.csv" in proc.stderr and "row(s) 4 ('99999999999')" in proc.stderr
    # The typo is one of the 3 distinct labels, so K = 3: labels must be 0..2, and 2 is unused.
    assert "not in 0..2" in proc.stderr and "no row has label 2" in proc.stderr and "classes.txt" in proc.stderr


def test_integer_label_classes_are_bounded_by_the_rows_not_by_the_largest_label(tmp_path: Path) -> None:
    csv = _integer_csv(tmp_path, ["0", "1", "10000000"])  # the old code built 10M classes (4.6 GB, 27 s)
    _, error, peak = _peak_bytes(lambda: load_splits(csv))
    assert isinstance(error, DataError) and "row(s) 4 ('10000000')" in str(error), error
    assert peak < SMALL_INPUT_PEAK_BYTES, peak
    # A gap is a missing class, named in the error; classes.txt declares the classes (then a gap may be empty).
    csv = _integer_csv(tmp_path, ["0", "2", "2"])
    with pytest.raises(DataError, match=r"row\(s\) 3 \('2'\), 4 \('2'\).*no row has label 1"):
        load_splits(csv)
    (tmp_path / "classes.txt").write_text("zero\none\ntwo\n")
    splits = load_splits(csv, val_fraction=0.0, allow_empty_classes=True)
    assert splits.class_names == ("zero", "one", "two") and splits.train.labels.tolist() == [0, 2, 2]
    (tmp_path / "classes.txt").unlink()
    splits = load_splits(_integer_csv(tmp_path, ["1", "0", "2", "1"]), val_fraction=0.0)
    assert splits.class_names == ("0", "1", "2") and splits.train.labels.tolist() == [1, 0, 2, 1]


def test_labels_with_thousands_of_digits_are_refused_without_building_the_integer(tmp_path: Path) -> None:
    # Python refuses int() of over 4300 digits with a plain ValueError: that must not escape as a traceback.
    csv = _integer_csv(tmp_path, ["0", "1" * 5000])
    with pytest.raises(DataError, match=r"row\(s\) 3 \('1111"):
        load_splits(csv)
    (tmp_path / "classes.txt").write_text("x\ny\n")
    with pytest.raises(DataError, match=r"out of range 0\.\.1 on row\(s\) 3"):
        load_splits(csv)


# --- Row 2: a header-only CSV ----------------------------------------------------------------------------------


def test_header_only_csv_is_a_data_error_and_the_cli_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    csv = tmp_path / "data.csv"
    csv.write_text("path,label\n")
    with pytest.raises(DataError, match=r"data\.csv: no data rows"):
        load_splits(csv)
    assert cli_main([str(csv)]) == 2
    err = capsys.readouterr().err
    _one_paragraph(err)
    assert "data.csv" in err and "no data rows" in err
    csv.write_text("")  # not even a header
    with pytest.raises(DataError, match="missing column"):
        load_splits(csv)


# --- Row 3: a class folder that is a symlink back into the root ------------------------------------------------


def test_symlinked_class_folders_into_or_above_the_root_are_not_followed(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds", {"a": 3, "b": 2})
    (root / "zzz").symlink_to(".")  # the root itself: every image again under class zzz
    (root / "up").symlink_to("..")  # above the root
    (root / "also_a").symlink_to("a")  # another class folder
    splits = load_splits(root, val_fraction=0.0)
    assert splits.class_names == ("a", "b") and len(splits.train) == 5
    skipped = {Path(p).name: r for p, r in splits.skipped}
    assert set(skipped) == {"zzz", "up", "also_a"} and all("symlink" in r for r in skipped.values())


def test_symlinks_elsewhere_are_followed_and_a_file_reached_twice_counts_once(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds", {"a": 2, "b": 2})
    make_folder_dataset(tmp_path / "elsewhere", {"c": 2})
    (root / "c").symlink_to(tmp_path / "elsewhere" / "c")  # outside the root: a real class
    (root / "b" / "copy_of_a.jpg").symlink_to(root / "a" / "000.jpg")
    (root / "b" / "loop").symlink_to(root / "b")  # inside a class folder: never walked
    splits = load_splits(root, val_fraction=0.0)
    assert splits.class_names == ("a", "b", "c") and splits.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    skipped = {Path(p).name: r for p, r in splits.skipped}
    assert "same file as" in skipped["copy_of_a.jpg"] and "not followed" in skipped["loop"]


def test_mask_layout_person_folder_symlinked_to_another_person_is_not_counted_twice(tmp_path: Path) -> None:
    make_mask_dataset(tmp_path, [("000001", "male", 20), ("000002", "female", 40)])
    (tmp_path / "images" / "000003_male_Asian_20").symlink_to("000001_male_Asian_20")
    splits = load_splits(tmp_path, val_fraction=0.0, allow_empty_classes=True)
    assert len(splits.train) == 14 and [Path(p).name for p, _ in splits.skipped] == ["000003_male_Asian_20"]


# --- Row 4: CSV rows pointing outside the data root ------------------------------------------------------------


def test_csv_rows_outside_the_data_root_are_refused_naming_each_row(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_image(root / "a.jpg", CLASS_COLOURS[0])
    write_image(root / "sub" / "b.jpg", CLASS_COLOURS[1])
    for name in ("secret.jpg", "secret2.jpg", "secret3.jpg"):  # real images: the old code loaded them silently
        write_image(tmp_path / name, CLASS_COLOURS[2])
    csv = root / "data.csv"
    csv.write_text(f"path,label\na.jpg,x\n../secret.jpg,y\n{tmp_path / 'secret2.jpg'},y\nsub/../../secret3.jpg,y\n")
    with pytest.raises(DataError) as info:
        load_splits(csv)
    message = str(info.value)
    _one_paragraph(message)
    assert "row(s) 3 ('../secret.jpg'), 4 (" in message and "5 ('sub/../../secret3.jpg')" in message
    assert "outside the data root" in message and str(root) in message
    # Inside the root, absolute paths and `..` that stay inside are fine.
    csv.write_text(f"path,label\na.jpg,x\n{root / 'sub' / 'b.jpg'},y\nsub/../sub/./b2.jpg,y\n")
    write_image(root / "sub" / "b2.jpg", CLASS_COLOURS[1])
    splits = load_splits(csv, val_fraction=0.0)
    assert len(splits.train) == 3 and splits.class_names == ("x", "y")


def test_train_csv_and_eval_rows_outside_their_images_folder_are_refused(tmp_path: Path) -> None:
    make_mask_dataset(tmp_path / "tr", [("000001", "male", 20)])
    make_mask_dataset(tmp_path / "other", [("000002", "male", 20)])  # someone else's person folder
    (tmp_path / "tr" / "train.csv").write_text(
        "id,gender,race,age,path\n1,male,Asian,20,000001_male_Asian_20\n"
        "2,male,Asian,20,../../other/images/000002_male_Asian_20\n"
    )
    with pytest.raises(DataError, match=r"train\.csv: path not a folder inside .* row\(s\) 3 \('\.\./\.\./other"):
        load_splits(tmp_path / "tr")
    write_image(tmp_path / "ev" / "images" / "a.jpg", CLASS_COLOURS[0])
    write_image(tmp_path / "secret.jpg", CLASS_COLOURS[1])
    (tmp_path / "ev" / "info.csv").write_text("ImageID,ans\na.jpg,0\n../../secret.jpg,0\n")
    with pytest.raises(DataError, match=r"info\.csv: ImageID not a file inside .* row\(s\) 3 \('\.\./\.\./secret"):
        load_eval_folder(tmp_path / "ev")


# --- Empty datasets and classes --------------------------------------------------------------------------------


def test_empty_datasets_and_empty_classes_get_errors_naming_them(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "f", {"a": 2})
    (root / "b").mkdir()
    (root / "c").mkdir()
    with pytest.raises(DataError, match=r"empty class folder\(s\).*b, .*c\. .*allow-empty-classes"):
        load_splits(root)
    (tmp_path / "m" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no person folders"):
        load_splits(tmp_path / "m")
    # A class whose only image is unreadable: the error says so.
    root = make_folder_dataset(tmp_path / "g", {"a": 2})
    (root / "b").mkdir()
    (root / "b" / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"classes with no usable images: b \(1 file\(s\) could not be read"):
        load_splits(root, max_bad_fraction=1.0)


def test_mask_ages_and_folder_names_are_checked_without_unicode_digit_surprises(tmp_path: Path) -> None:
    assert parse_person_folder("000001_female_Asian_45") == (1, 45)
    assert parse_person_folder("000001_Male_Asian_Indian_045") == (0, 45)
    for name in ("000001_male_Asian_٤٥", "000001_male_Asian_151", "000001_male_Asian_" + "9" * 5000, "_male_A_20"):
        assert parse_person_folder(name) is None, name
    make_mask_dataset(tmp_path, [("000001", "male", 20)])
    (tmp_path / "train.csv").write_text("id,gender,race,age,path\n1,male,Asian,²,000001_male_Asian_20\n")
    with pytest.raises(DataError, match=rf"age not a whole number 0\.\.{MAX_AGE} on row\(s\) 2 \('²'\)"):
        load_splits(tmp_path)


# --- Fuzzing: arbitrary text raises DataError or loads, within a small memory bound --------------------------


@pytest.fixture(scope="module")
def image_bytes() -> dict[str, bytes]:
    out = {}
    for fmt, ext in (("JPEG", ".jpg"), ("PNG", ".png")):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), CLASS_COLOURS[0]).save(buf, format=fmt)
        out[ext] = buf.getvalue()
    return out


@pytest.fixture(scope="module")
def csv_root(tmp_path_factory, image_bytes) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "ds"
    for name in ROOT_IMAGES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(image_bytes[os.path.splitext(name)[1]])
    (root.parent / "outside.jpg").write_bytes(image_bytes[".jpg"])  # a real image the CSV must not reach
    return root


def _load_or_refuse(path: Path, **kwargs) -> object:
    """load_splits' result, or None when it refused with DataError; any other exception fails the test."""
    splits, error, peak = _peak_bytes(lambda: load_splits(path, **kwargs))
    assert error is None or isinstance(error, DataError), repr(error)
    assert peak < SMALL_INPUT_PEAK_BYTES, peak
    if error is not None:
        _one_paragraph(str(error))
    event("refused" if error is not None else "loaded")  # --hypothesis-show-statistics: both must occur
    return splits


PATH_TEXT = st.one_of(
    st.sampled_from([*ROOT_IMAGES, "./a.jpg", "sub/../a.jpg", "../outside.jpg", "/etc/passwd", "", ".", "sub"]),
    st.text(max_size=30),
)
LABEL_TEXT = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.integers(0, 4).map(str),
    st.sampled_from(["cat", "dog", " cat ", ""]),
    st.text(max_size=12),
)
CSV_FIELD = st.one_of(PATH_TEXT, LABEL_TEXT)
# Rows that load (each image once), so the fuzzer also explores what a mostly good file does.
GOOD_ROWS = st.lists(st.sampled_from(ROOT_IMAGES), unique=True, max_size=len(ROOT_IMAGES)).flatmap(
    lambda paths: st.lists(st.sampled_from(["0", "1", "cat"]), min_size=len(paths), max_size=len(paths)).map(
        lambda labels: [[p, lbl] for p, lbl in zip(paths, labels, strict=True)]
    )
)


def _csv_line(fields: list[str] | tuple[str, ...]) -> str:
    return ",".join('"' + f.replace('"', '""') + '"' if any(c in f for c in ',"\n\r') else f for f in fields)


@SETTINGS
@given(
    header=st.one_of(
        st.just("path,label"), st.just("path,label,group"), st.sampled_from(["path", "path,label,label", ""])
    ),
    rows=st.tuples(GOOD_ROWS, st.lists(st.lists(CSV_FIELD, max_size=4), max_size=3)).map(lambda t: t[0] + t[1]),
    classes=st.one_of(
        st.none(), st.text(max_size=40), st.lists(st.sampled_from(["cat", "dog", "0", "x"])).map("\n".join)
    ),
    allow_empty=st.booleans(),
)
def test_fuzzed_csv_rows_load_or_raise_data_error(csv_root, header, rows, classes, allow_empty):
    csv = csv_root / "data.csv"
    csv.write_text("\n".join([header, *(_csv_line(r) for r in rows)]) + "\n", encoding="utf-8")
    classes_file = csv_root / "classes.txt"
    classes_file.unlink(missing_ok=True)
    if classes is not None:
        classes_file.write_text(classes, encoding="utf-8")
    splits = _load_or_refuse(csv, val_fraction=0.0, allow_empty_classes=allow_empty, max_bad_fraction=1.0)
    if splits is not None:
        # Memory proportional to the data: never more classes than rows (or declared names).
        assert 0 < splits.num_classes <= max(len(rows), len(classes.splitlines()) if classes else 0)
        assert all(0 <= lbl < splits.num_classes for lbl in splits.train.labels)
        root = os.path.abspath(csv_root)
        assert all(os.path.commonpath([root, os.path.abspath(p)]) == root for p in splits.train.paths)


@SETTINGS
@given(
    content=st.one_of(
        st.text(max_size=300),
        st.binary(max_size=300),
        st.builds(
            str.__add__,
            st.sampled_from(["path,label\n", "path,label,group\n", "\ufeffpath,label\r\n"]),
            st.text(max_size=200),
        ),
    )
)
def test_arbitrary_csv_text_or_bytes_load_or_raise_data_error(csv_root, content):
    csv = csv_root / "raw.csv"
    if isinstance(content, str):
        csv.write_text(content, encoding="utf-8")
    else:
        csv.write_bytes(content)
    (csv_root / "classes.txt").unlink(missing_ok=True)
    _load_or_refuse(csv, val_fraction=0.0, allow_empty_classes=True, max_bad_fraction=1.0)


def _reference_person(name: str) -> tuple[int, int] | None:
    """An independent reading of docs/data.md's <id>_<male|female>_<race>_<age>, by splitting on underscores."""
    parts = name.split("_")
    if len(parts) < 4 or not parts[0]:
        return None
    gender, race, age = parts[1], "_".join(parts[2:-1]), parts[-1]
    if gender.lower() not in ("male", "female") or not race or not (age.isascii() and age.isdigit()):
        return None
    if len(age.lstrip("0")) > 3 or int(age) > MAX_AGE:
        return None
    return ("male", "female").index(gender.lower()), int(age)


NAME_PART = st.one_of(
    st.sampled_from(["000001", "male", "FEMALE", "Asian", "30", "150", "151", "٣", "", "x_y"]), st.text(max_size=6)
)


@SETTINGS
@given(st.one_of(st.lists(NAME_PART, min_size=1, max_size=6).map("_".join), st.text(max_size=40)))
def test_person_folder_names_parse_as_the_documented_pattern_or_not_at_all(name):
    assert parse_person_folder(name) == _reference_person(name)


def _fs_name(text: str) -> bool:
    return text not in ("", ".", "..") and "/" not in text and "\0" not in text and len(text.encode()) <= 255


GOOD_FOLDER = st.builds(
    "{}_{}_{}_{}".format,
    st.integers(0, 999999),
    st.sampled_from(["male", "female", "Female"]),
    st.sampled_from(["Asian", "x_y"]),
    st.integers(0, 200),
)
FOLDER_NAME = st.one_of(
    GOOD_FOLDER, st.lists(NAME_PART, min_size=4, max_size=5).map("_".join), st.text(min_size=1, max_size=20)
)
STEMS = ["mask1", "mask5", "MASK2", "incorrect_mask", "normal", "mask6", "._mask1"]
FILE_NAME = st.one_of(
    st.builds(str.__add__, st.sampled_from(STEMS), st.sampled_from([".jpg", ".PNG", ".txt", ""])),
    st.builds(str.__add__, st.sampled_from(STEMS[:5]), st.just(".jpg")),
    st.text(min_size=1, max_size=20),
)
# docs/data.md, by hand: mask1..5 worn, incorrect_mask, normal (not worn).
EXPECTED_STATE = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}


@SETTINGS
@given(
    folders=st.one_of(
        st.dictionaries(GOOD_FOLDER, st.lists(FILE_NAME.filter(_fs_name), max_size=4), min_size=1, max_size=4),
        st.dictionaries(
            FOLDER_NAME.filter(_fs_name), st.lists(FILE_NAME.filter(_fs_name), max_size=4), min_size=1, max_size=4
        ),
    ),
    with_train_csv=st.booleans(),
    allow_empty=st.booleans(),
    data=st.data(),
)
def test_fuzzed_mask_layouts_load_with_the_documented_labels_or_raise_data_error(
    tmp_path, image_bytes, folders, with_train_csv, allow_empty, data
):
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        root = Path(tmp)
        for folder, files in folders.items():
            (root / "images" / folder).mkdir(parents=True, exist_ok=True)
            for name in files:
                ext = ".png" if name.lower().endswith(".png") else ".jpg"
                (root / "images" / folder / name).write_bytes(image_bytes[ext])
        if with_train_csv:
            folder = st.sampled_from(sorted(folders))
            field = st.one_of(NAME_PART, folder, st.integers(-1, 200).map(str))
            good = st.tuples(st.just("1"), st.sampled_from(["male", "female"]), st.just("A"), st.just("20"), folder)
            rows = data.draw(st.lists(st.one_of(good, st.lists(field, min_size=3, max_size=6)), max_size=4))
            lines = ["id,gender,race,age,path", *(_csv_line(r) for r in rows)]
            (root / "train.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        splits = _load_or_refuse(root, val_fraction=0.0, allow_empty_classes=allow_empty, max_bad_fraction=1.0)
        if splits is None or with_train_csv:
            return
        for path, label in zip(splits.train.paths, splits.train.labels, strict=True):
            gender, age = _reference_person(Path(path).parent.name)
            state = EXPECTED_STATE[os.path.splitext(Path(path).name)[0].lower()]
            band = 0 if age < 30 else 1 if age < 60 else 2
            assert label == 6 * state + 3 * gender + band, path
