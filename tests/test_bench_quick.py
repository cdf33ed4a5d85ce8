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
from bench.common import TINY, CaseSpec
from bench.counting import activation_elements, step_counts
from bench.plan import PlanSettings, build_plan
from bench.runner import run_case, run_plan
from torch_ref import Darknet53

REPO = Path(__file__).resolve().parent.parent
# Out of the CI budget on 2 cores: torch.compile's CPU backward (~40 s of C++ compilation) and the
# trainer's own step (its compile takes 40-50 s here; the trainer's tests compile it already).
SKIP = ("torch/*/compile*", "flax/train/trainer*")


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
    assert "flax/train/trainer_bf16/b2: skipped" in skipped
    assert "end-to-end train.flax loop: skipped: --no-e2e" in skipped
    md = result["_markdown"]
    assert all(f"| {name} |" in md for name in expected)
    assert "## Goals (issue 6)" in md and "skipped" in md


def test_counts_match_the_reference_figures() -> None:
    # shared/reference.md section 1: 18.57 GFLOP forward, about 55.7 GFLOP per training image at 256 px.
    c = step_counts(batch=1, image_size=256)
    assert c.fwd_flop_per_image / 1e9 == pytest.approx(18.57, abs=0.01)
    assert c.train_flop_per_image / 1e9 == pytest.approx(55.7, abs=0.05)
    assert c.params == 40_603_378


@pytest.mark.parametrize("image_size", [32, 64])
def test_activation_count_matches_the_torch_model_outputs(image_size: int) -> None:
    # Independent count: sum the numel of every conv output and every residual-block output in torch_ref.
    from torch_ref.model import ResidualBlock

    model = Darknet53(config=TINY).eval()
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d | ResidualBlock):
            m.register_forward_hook(lambda _m, _i, out: seen.append(out[0].numel()))
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    assert activation_elements(TINY, image_size) == sum(seen)


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
    # 11 (framework, mode, variant) combinations at 2 batch sizes, the warm-cache rerun, 2 real-loop runs.
    assert len(names) == len(set(names)) == 2 * 11 + 1 + 2 and not skipped
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
        (["--batch-sizes", "128,x"], "comma-separated batch sizes"),
        (["--steps", "0"], "positive integer"),
        (["--arch", "resnet"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_real_loop_rates_are_read_from_the_trainers_own_progress_lines() -> None:
    # The trainer's Progress class writes the lines; bench.e2e must read back exactly the rates it was given.
    import io

    from bench.e2e import parse_rates
    from train.logging_utils import Progress

    stream = io.StringIO()
    progress = Progress(total=30, start=0, every=10, stream=stream)
    rates = [12.5, 4321.0, 5000.3]  # the trainer prints one decimal
    for step in range(1, 31):
        progress.update(step, loss=2.5, images_per_s=rates[(step - 1) // 10], epoch=0)
    assert parse_rates(stream.getvalue()) == pytest.approx(rates, abs=0.05)


def test_real_loop_dataset_has_the_mask_layout_and_every_class(tmp_path: Path) -> None:
    from PIL import Image

    from bench.e2e import MASK_STEMS, PERSON_KINDS, write_dataset

    root = write_dataset(tmp_path / "data", num_images=20, height=64, width=48)
    persons = sorted((root / "images").iterdir())
    assert len(persons) == 2 * len(PERSON_KINDS)  # at least two persons of each gender x age band
    for person in persons:
        assert sorted(p.stem for p in person.glob("*.jpg")) == sorted(MASK_STEMS)
    with Image.open(persons[0] / "mask1.jpg") as img:
        assert img.format == "JPEG" and img.size == (48, 64)
    data = pytest.importorskip("train.data")
    splits = data.load_splits(root, val_fraction=0.2, seed=0)
    assert len(splits.class_names) == 18 and len(splits.train) + len(splits.val) == 7 * len(persons)


def test_goal_rows_are_computed_from_the_matching_cases() -> None:
    from bench.report import goals, goals_table

    def ok(name: str, **fields: float) -> dict:
        framework, mode, variant, batch = name.split("/")[:4]
        return {"name": name, "status": "ok", "framework": framework, "mode": mode, "variant": variant,
                "batch": int(batch[1:]), **fields}  # fmt: skip

    records = [
        ok("flax/train/bf16/b256", img_per_s=6100.0, peak_mem_bytes=10 * 2**30),
        ok("torch/train/eager_amp_bf16_cl/b256", img_per_s=3050.0, peak_mem_bytes=20 * 2**30),
        ok("flax/train/bf16/b128", img_per_s=5000.0, compile_s=31.0),
        ok("torch/train/eager_amp_bf16_cl/b128", img_per_s=3000.0),
        ok("torch/train/compile_amp_bf16_cl/b128", img_per_s=4000.0, compile_s=76.0),
        ok("flax/train/bf16/b128/warm-cache", img_per_s=5000.0, startup_s=4.0),
        ok("flax/train/trainer_bf16/b128", img_per_s=4000.0, img_per_s_read_back_each_step=3600.0),
        ok("e2e/train/jpeg/b128", img_per_s=3000.0),
        ok("e2e/train/cache/b128", img_per_s=3900.0),
        {**ok("flax/infer/bf16/b128", img_per_s=1.0), "status": "failed"},  # a failed case fills nothing
    ]
    rows = {r["figure"]: r for r in goals(records)}
    b256 = rows["train img/s, B=256, bf16"]
    assert (b256["flax"], b256["met"], b256["flax_vs_best_torch"]) == (6100.0, True, "2.00x")
    b128 = rows["train img/s, B=128, bf16"]
    assert (b128["met"], b128["flax_vs_best_torch"]) == (False, "1.25x")  # against torch.compile's 4000
    assert rows["inference img/s, B=128, bf16"]["flax"] is None
    assert rows["cold compile of the train step (s)"]["met"] is False
    assert rows["cold compile of the train step (s)"]["torch_compile"] == 76.0
    warm = next(r for f, r in rows.items() if f.startswith("start-up"))
    assert (warm["flax"], warm["met"]) == (4.0, True)
    assert rows["real loop / pure trainer step, JPEG files"]["flax"] == pytest.approx(0.75)
    assert rows["real loop / pure trainer step, decoded cache"]["met"] is True  # 3900 / 4000
    read_back = next(r for f, r in rows.items() if f.startswith("pure trainer step with a host read"))
    assert read_back["flax"] == pytest.approx(0.9)
    mem = rows["peak device memory, train B=256 bf16 (GiB)"]
    assert (mem["flax"], mem["torch_amp"], mem["met"]) == (10.0, 20.0, True)
    table = goals_table(list(rows.values()))
    assert "| 0.750 | >= 0.90 | no |" in table and "| 6100.0 | >= 6,000 | yes | 2.00x |" in table
