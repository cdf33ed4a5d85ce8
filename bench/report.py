"""Turn benchmark records into the markdown tables of RESULTS.md: every case, then the issue's goals."""

from __future__ import annotations

from typing import Any

GIB = 1024**3
# The issue's goals (H200; the same ratios against PyTorch hold on an H100).
GOAL_TRAIN_B256 = 6000.0
GOAL_TRAIN_B128 = 5500.0
GOAL_INFER_B128 = 22000.0
GOAL_COLD_COMPILE_S = 30.0
GOAL_WARM_START_S = 5.0
GOAL_LOOP_RATIO = 0.90


def _fmt(value: Any, spec: str = ".1f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _gib(value: Any) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _xla_gb(cost: Any) -> str:
    """XLA's bytes-accessed estimate of the compiled step, in GB ('-' where it was not available)."""
    if not isinstance(cost, dict) or cost.get("bytes_accessed") is None:
        return "-"
    return f"{cost['bytes_accessed'] / 1e9:.2f}"


def cases_table(records: list[dict[str, Any]]) -> str:
    """One row per case: throughput, step time, compile/first step, start-up, peak memory, status."""
    lines = [
        "| case | batch | img/s | step ms (median) | compile s | first step s | start-up s | peak GiB "
        "| XLA GB/step | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
        lines.append(
            f"| {r['name']} | {r['batch']} | {_fmt(r.get('img_per_s'))} | {_fmt(r.get('step_ms_median'), '.2f')} "
            f"| {_fmt(r.get('compile_s'))} | {_fmt(r.get('first_step_s'), '.2f')} | {_fmt(r.get('startup_s'))} "
            f"| {_gib(r.get('peak_mem_bytes'))} | {_xla_gb(r.get('xla_cost'))} | {status.replace('|', '/')} |"
        )
    return "\n".join(lines)


def _find(records: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for r in records:
        if r["name"] == name and r["status"] == "ok":
            return r
    return None


def _img_s(records: list[dict[str, Any]], name: str) -> float | None:
    r = _find(records, name)
    return None if r is None else r["img_per_s"]


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def goals(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goal rows, filled from the records that exist (None where a case did not run)."""
    rows = []
    for label, batch, mode, goal in (
        ("train img/s, B=256, bf16", 256, "train", GOAL_TRAIN_B256),
        ("train img/s, B=128, bf16", 128, "train", GOAL_TRAIN_B128),
        ("inference img/s, B=128, bf16", 128, "infer", GOAL_INFER_B128),
    ):
        flax = _img_s(records, f"flax/{mode}/bf16/b{batch}")
        amp = _img_s(records, f"torch/{mode}/eager_amp_bf16_cl/b{batch}")
        comp = _img_s(records, f"torch/{mode}/compile_amp_bf16_cl/b{batch}")
        best_torch = max((v for v in (amp, comp) if v is not None), default=None)
        rows.append(
            {
                "figure": label,
                "torch_amp": amp,
                "torch_compile": comp,
                "flax": flax,
                "goal": f">= {goal:,.0f}",
                "met": None if flax is None else flax >= goal,
                "flax_vs_best_torch": _ratio(flax, best_torch),
            }
        )
    cold = _find(records, "flax/train/bf16/b128")
    warm = _find(records, "flax/train/bf16/b128/warm-cache")
    cold_s = None if cold is None else cold["compile_s"]
    comp = _find(records, "torch/train/compile_amp_bf16_cl/b128")
    rows.append(
        {
            "figure": "cold compile of the train step (s)",
            "torch_amp": None,
            "torch_compile": None if comp is None else comp["compile_s"],
            "flax": cold_s,
            "goal": f"<= {GOAL_COLD_COMPILE_S:.0f}",
            "met": None if cold_s is None else cold_s <= GOAL_COLD_COMPILE_S,
            "flax_vs_best_torch": "-",
        }
    )
    warm_s = None if warm is None else warm["startup_s"]
    rows.append(
        {
            "figure": "start-up with a warm compilation cache (s, process start to first step done)",
            "torch_amp": None,
            "torch_compile": None,
            "flax": warm_s,
            "goal": f"<= {GOAL_WARM_START_S:.0f}",
            "met": None if warm_s is None else warm_s <= GOAL_WARM_START_S,
            "flax_vs_best_torch": "-",
        }
    )
    for variant, what in (("jpeg", "JPEG files"), ("cache", "decoded cache")):
        loop = next((r for r in records if r["framework"] == "e2e" and r["variant"] == variant), None)
        ratio = None
        if loop is not None and loop["status"] == "ok":
            pure = _img_s(records, f"flax/train/trainer_bf16/b{loop['batch']}")
            ratio = None if pure is None else loop["img_per_s"] / pure
        rows.append(
            {
                "figure": f"real loop / pure trainer step, {what}",
                "torch_amp": None,
                "torch_compile": None,
                "flax": ratio,
                "goal": f">= {GOAL_LOOP_RATIO:.2f}",
                "fmt": ".3f",
                "met": None if ratio is None else ratio >= GOAL_LOOP_RATIO,
                "flax_vs_best_torch": "-",
            }
        )
    trainer = next((r for r in records if r["variant"] == "trainer_bf16" and r["status"] == "ok"), None)
    read_back = None if trainer is None else trainer.get("img_per_s_read_back_each_step")
    rows.append(
        {
            "figure": "pure trainer step with a host read of the loss after every step / without (diagnostic)",
            "torch_amp": None,
            "torch_compile": None,
            "flax": None if read_back is None else read_back / trainer["img_per_s"],
            "goal": "-",
            "fmt": ".3f",
            "met": None,
            "flax_vs_best_torch": "-",
        }
    )
    flax_mem = _find(records, "flax/train/bf16/b256")
    amp_mem = _find(records, "torch/train/eager_amp_bf16_cl/b256")
    fm = None if flax_mem is None else flax_mem.get("peak_mem_bytes")
    am = None if amp_mem is None else amp_mem.get("peak_mem_bytes")
    rows.append(
        {
            "figure": "peak device memory, train B=256 bf16 (GiB)",
            "torch_amp": None if am is None else am / GIB,
            "torch_compile": None,
            "flax": None if fm is None else fm / GIB,
            "goal": "<= PyTorch AMP's",
            "met": None if fm is None or am is None else fm <= am,
            "flax_vs_best_torch": _ratio(fm, am),
        }
    )
    return rows


def goals_table(rows: list[dict[str, Any]]) -> str:
    """The goal rows as markdown."""
    lines = [
        "| figure | PyTorch eager AMP | torch.compile | Flax (this run) | goal | met | Flax / best PyTorch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "no")
        flax = _fmt(r["flax"], r.get("fmt", ".1f"))
        lines.append(
            f"| {r['figure']} | {_fmt(r['torch_amp'])} | {_fmt(r['torch_compile'])} | {flax} "
            f"| {r['goal']} | {met} | {r['flax_vs_best_torch']} |"
        )
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """The whole report: the run's facts, the cases, the goals, the counts."""
    meta = result["meta"]
    out = [
        f"# Benchmark run {meta['date']}",
        "",
        f"- command: `{meta['command']}`",
        f"- host: {meta['host']}; devices: {', '.join(meta.get('devices') or ['?'])}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- settings: {meta['settings']}",
        "",
        "## Cases",
        "",
        cases_table(result["cases"]),
        "",
        "## Goals (issue 6)",
        "",
        goals_table(result["goals"]),
        "",
        "## Counts (from the shapes; see bench/counting.py)",
        "",
    ]
    for key, value in result["counts"].items():
        out.append(f"- {key}: {value}")
    if result.get("skipped_parts"):
        out += ["", "## Skipped parts", ""]
        out += [f"- {part}" for part in result["skipped_parts"]]
    return "\n".join(out) + "\n"
