"""The benchmark's CPU smoke test (`--quick`, no timing assertions) and its counting against independent sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.benchmark import parse_args
from bench.common import NUM_CLASSES, CaseSpec
from bench.counting import activation_elements, step_counts
from bench.runner import PlanSettings, build_plan, run_case, run_plan
from darknet_arch import DARKNET53, TINY
from torch_ref import Darknet53

REPO = Path(__file__).resolve().parent.parent
# Out of the CI budget on 2 cores: torch.compile's CPU backward (~40 s of C++ compilation).
SKIP = ("torch/*/compile*",)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "bench.benchmark", "--quick", "--out", str(out)]
    for pattern in SKIP:
        cmd += ["--skip", pattern]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    result = json.loads((out / "results.json").read_text())
    result["_markdown"] = (out / "results.md").read_text()
    return proc, result


@pytest.mark.slow
def test_quick_run_measures_every_cpu_mode_and_names_what_it_skipped(quick_run) -> None:
    proc, result = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_name = {r["name"]: r for r in result["cases"]}
    expected = {
        "flax/train/bf16/b2",
        "flax/train/fp32/b2",
        "flax/infer/bf16/b2",
        "flax/infer/fp32/b2",
        "torch/train/eager_fp32/b2",
        "torch/infer/eager_fp32/b2",
        "torch/train/eager_amp_bf16_cl/b2",
        "torch/infer/eager_amp_bf16_cl/b2",
        "flax/train/bf16/b2/warm-cache",
    }
    assert set(by_name) == expected
    for name, r in by_name.items():
        assert r["status"] == "ok", (name, r.get("reason"), r.get("traceback") or r.get("stderr_tail"))
        assert r["img_per_s"] > 0 and len(r["step_ms_windows"]) == r["repeats"]
        if r["mode"] == "train":
            assert r["final_loss"] == pytest.approx(r["final_loss"])  # finite, not NaN
    # The cold and the warm cache run were separate processes, each timed from its spawn.
    for name in ("flax/train/bf16/b2", "flax/train/bf16/b2/warm-cache"):
        assert by_name[name]["startup_s"] > 0 and by_name[name]["process_wall_s"] >= by_name[name]["startup_s"]
    skipped = "\n".join(result["skipped_parts"])
    assert "torch/train/compile_amp_bf16_cl/b2: skipped: excluded by --skip" in skipped
    assert "torch/infer/compile_amp_bf16_cl/b2: skipped" in skipped
    assert "end-to-end train.flax loop: skipped: --no-e2e" in skipped
    md = result["_markdown"]
    assert all(f"| {name} |" in md for name in expected)
    # The report says which step and optimizer both sides ran.
    assert "train.state.train_step" in md and "Nesterov" in md and "make_torch_optimizer" in md
    assert "## Headline figures" in md and "skipped" in md


@pytest.mark.parametrize(("config", "image_size"), [(DARKNET53, 64), (TINY, 32), (TINY, 64)])
def test_counts_match_the_torch_model_hooks(config, image_size: int) -> None:
    # Independent count: hooks on every Conv2d, Linear and residual block of torch_ref sum the multiply-adds,
    # the activation elements (conv outputs and residual sums) and, with the parameters, what counting.py says.
    from torch_ref.model import ResidualBlock

    model = Darknet53(num_classes=NUM_CLASSES, config=config).eval()
    macs, acts = [], []

    def hook(m: torch.nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
        if isinstance(m, torch.nn.Linear):
            macs.append(m.in_features * m.out_features)
            return
        if isinstance(m, torch.nn.Conv2d):
            macs.append(out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
        acts.append(out[0].numel())

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear | ResidualBlock):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    counts = step_counts(config, NUM_CLASSES, image_size, batch=1)
    assert counts["fwd_flop_per_image"] == 2 * sum(macs)
    assert counts["train_flop_per_image"] == 3 * counts["fwd_flop_per_image"]
    assert counts["params"] == sum(p.numel() for p in model.parameters())
    assert activation_elements(config, image_size) == sum(acts)


def test_num_classes_is_the_competitions() -> None:
    data = pytest.importorskip("train.data")
    assert len(data.MASK_CLASS_NAMES) == NUM_CLASSES


def test_plan_puts_goal_cases_first_and_isolates_only_the_cache_pair(tmp_path: Path) -> None:
    settings = PlanSettings((128, 256), 256, "darknet53", 3, 10, 5)
    specs, skipped = build_plan(settings, str(tmp_path))
    names = [s.name for s in specs]
    assert names[:4] == [
        "flax/train/bf16/b128",
        "flax/train/bf16/b256",
        "torch/train/eager_amp_bf16_cl/b128",
        "torch/train/eager_amp_bf16_cl/b256",
    ]
    # 10 (framework, mode, variant) combinations at 2 batch sizes, the warm-cache rerun, 2 real-loop runs.
    assert len(names) == len(set(names)) == 2 * 10 + 1 + 2 and not skipped
    cached = [s.name for s in specs if s.cache_dir and s.framework == "flax"]
    assert cached == ["flax/train/bf16/b128", "flax/train/bf16/b128/warm-cache"]
    assert names.index("flax/train/bf16/b128/warm-cache") > names.index("flax/train/bf16/b128")


def test_spent_budget_records_the_rest_as_skipped(tmp_path: Path) -> None:
    specs, _ = build_plan(PlanSettings((2,), 32, "tiny", 0, 1, 1), str(tmp_path), e2e=False)
    seen: list[int] = []
    records = run_plan(specs, isolate=False, budget_s=-1.0, case_timeout_s=10, on_result=lambda r: seen.append(len(r)))
    assert [r["status"] for r in records] == ["skipped"] * len(specs)
    assert all("time budget" in r["reason"] for r in records)
    assert seen == list(range(1, len(specs) + 1))  # written after every case


def test_a_broken_case_is_recorded_as_failed_with_its_reason() -> None:
    # 48 px is not a multiple of the total stride 32: the model refuses it while the step is traced.
    record = run_case(CaseSpec("torch", "infer", "eager_fp32", batch=1, image_size=48, arch="tiny", warmup=0))
    assert record["status"] == "failed"
    assert "InputShapeError" in record["reason"] and "multiples of 32" in record["reason"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quick", "--image-size", "40"], "multiple of 32"),
        (["--batch-sizes", "128,x"], "--batch-sizes: expected a positive integer, got 'x'"),
        (["--steps", "0"], "positive integer"),
        (["--arch", "resnet"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_an_unwritable_out_folder_exits_2_naming_it(tmp_path: Path, capsys) -> None:
    from bench.benchmark import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["--quick", "--out", str(blocker / "out")]) == 2
    assert f"--out {blocker / 'out'}: cannot create it" in capsys.readouterr().err


def test_real_loop_rates_are_read_from_the_trainers_own_progress_lines() -> None:
    # The trainer's Progress class writes the lines; bench.e2e must read back exactly the rates it was given.
    import io

    from bench.e2e import parse_rates
    from train.logging_utils import Progress

    stream = io.StringIO()
    progress = Progress(total=30, every=10, steps_per_epoch=20, stream=stream)
    rates = [12.5, 4321.0, 5000.3]  # the trainer prints one decimal
    for step in range(1, 31):
        progress.update(step, loss=2.5, images_per_s=rates[(step - 1) // 10])
    assert parse_rates(stream.getvalue()) == pytest.approx(rates, abs=0.05)


def test_real_loop_dataset_has_the_mask_layout_and_every_class(tmp_path: Path) -> None:
    from PIL import Image

    from bench.fixture import MASK_STEMS, PERSON_KINDS, write_dataset

    root = tmp_path / "data"
    paths = write_dataset(root, num_images=20, height=64, width=48)
    assert len(paths) == len(set(paths)) == 2 * len(PERSON_KINDS) * len(MASK_STEMS)
    persons = sorted((root / "images").iterdir())
    assert len(persons) == 2 * len(PERSON_KINDS)  # at least two persons of each gender x age band
    for person in persons:
        assert sorted(p.stem for p in person.glob("*.jpg")) == sorted(MASK_STEMS)
    with Image.open(persons[0] / "mask1.jpg") as img:
        assert img.format == "JPEG" and img.size == (48, 64)
    data = pytest.importorskip("train.data")
    splits = data.load_splits(root, val_fraction=0.2, seed=0)
    assert len(splits.class_names) == 18 and len(splits.train) + len(splits.val) == 7 * len(persons)


def test_headline_rows_are_computed_from_the_matching_cases() -> None:
    from bench.report import headline, headline_table

    def ok(name: str, **fields: float) -> dict:
        framework, mode, variant, batch = name.split("/")[:4]
        return {"name": name, "status": "ok", "framework": framework, "mode": mode, "variant": variant,
                "batch": int(batch[1:]), **fields}  # fmt: skip

    records = [
        ok(
            "flax/train/bf16/b128",
            img_per_s=5000.0,
            compile_s=31.0,
            cache_dir="/c",
            img_per_s_read_back_each_step=4500.0,
        ),
        ok("flax/train/bf16/b256", img_per_s=6100.0, peak_mem_bytes=10 * 2**30),
        ok("torch/train/eager_amp_bf16_cl/b128", img_per_s=3000.0),
        ok("torch/train/eager_amp_bf16_cl/b256", img_per_s=3050.0, peak_mem_bytes=20 * 2**30),
        ok("torch/train/compile_amp_bf16_cl/b128", img_per_s=4000.0, compile_s=76.0),
        ok("flax/train/bf16/b128/warm-cache", img_per_s=5000.0, startup_s=4.0, cache_dir="/c"),
        ok("e2e/train/jpeg/b128", img_per_s=3750.0),
        {**ok("e2e/train/cache/b128", img_per_s=1.0), "status": "failed"},  # a failed case fills nothing
        {**ok("flax/infer/bf16/b128", img_per_s=1.0), "status": "failed"},
    ]
    rows = {r["figure"]: r for r in headline(records)}
    b256 = rows["train img/s, B=256, bf16"]
    assert (b256["flax"], b256["torch_amp"], b256["ratio"]) == (6100.0, 3050.0, 2.0)
    assert rows["train img/s, B=128, bf16"]["ratio"] == pytest.approx(1.25)  # against torch.compile's 4000
    assert rows["inference img/s, B=128, bf16"]["flax"] is None
    cold = rows["cold compile of the train step, B=128 (s)"]
    assert (cold["flax"], cold["torch_compile"]) == (31.0, 76.0) and cold["ratio"] == pytest.approx(31 / 76)
    assert next(r for f, r in rows.items() if f.startswith("start-up"))["flax"] == 4.0
    assert rows["real loop (jpeg) / pure train step"]["flax"] == pytest.approx(0.75)
    assert not any("(cache)" in f for f in rows)
    assert next(r for f, r in rows.items() if "host read" in f)["flax"] == pytest.approx(0.9)
    mem = rows["peak device memory, train B=256, bf16 (GiB)"]
    assert (mem["flax"], mem["torch_amp"], mem["ratio"]) == (10.0, 20.0, 0.5)
    table = headline_table(list(rows.values()))
    assert "| train img/s, B=256, bf16 | 3050.0 | - | 6100.0 | 2.00 |" in table


def test_torch_threads_run_each_pytorch_case_per_count_and_the_fp32_table_takes_the_best() -> None:
    from bench.report import fp32_rows, fp32_table

    settings = PlanSettings((32,), 32, "tiny", 0, 1, 1, torch_threads=(1, 2))
    specs, _ = build_plan(settings, "/unused", only=["*/fp32/*", "*eager_fp32*"], e2e=False)
    assert [s.name for s in specs] == [
        "flax/train/fp32/b32",
        "flax/infer/fp32/b32",
        "torch/train/eager_fp32/b32/t1",
        "torch/train/eager_fp32/b32/t2",
        "torch/infer/eager_fp32/b32/t1",
        "torch/infer/eager_fp32/b32/t2",
    ]
    rates = {"flax/train": 150.0, "flax/infer": 700.0, "torch/train/t1": 90.0, "torch/train/t2": 120.0,
             "torch/infer/t1": 500.0, "torch/infer/t2": 350.0}  # fmt: skip
    records = []
    for s in specs:
        key = f"{s.framework}/{s.mode}" + (f"/t{s.threads}" if s.threads else "")
        records.append({"name": s.name, "status": "ok", "framework": s.framework, "mode": s.mode,
                        "variant": s.variant, "batch": s.batch, "img_per_s": rates[key],
                        **({"torch_threads": s.threads} if s.threads else {})})  # fmt: skip
    rows = {r["figure"]: r for r in fp32_rows(records)}
    train, infer = rows["train img/s, B=32, fp32"], rows["inference img/s, B=32, fp32"]
    assert (train["best_threads"], train["ratio"]) == (2, pytest.approx(1.25))
    assert (infer["best_threads"], infer["ratio"]) == (1, pytest.approx(1.4))
    assert "| train img/s, B=32, fp32 | 90.0 (1 thr), 120.0 (2 thr) | 150.0 | 1.25 |" in fp32_table(list(rows.values()))
    with pytest.raises(ValueError, match="thread"):
        CaseSpec("flax", "train", "fp32", 2, 32, threads=2)
