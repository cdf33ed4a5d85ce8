"""Benchmark records -> markdown: every case, then the headline figures (the goals they answer are in RESULTS.md)."""

from __future__ import annotations

from typing import Any

GIB = 1024**3


def _fmt(value: Any, spec: str | None = None) -> str:
    if value is None:
        return "-"
    return format(value, spec or (".1f" if abs(value) >= 10 else ".3f"))


def cases_table(records: list[dict[str, Any]]) -> str:
    """One row per case: throughput, step time, compile/first step, start-up, peak memory, status."""
    header = (
        "| case | batch | img/s | step ms (median) | compile s | first step s | start-up s | peak GiB | XLA GB/step |"
    )
    lines = [header + " status |", "|---" * 10 + "|"]
    for r in records:
        cost = r.get("xla_cost")
        xla = cost.get("bytes_accessed") if isinstance(cost, dict) else None
        peak = r.get("peak_mem_bytes")
        cells = [
            _fmt(r.get("img_per_s"), ".1f"),
            _fmt(r.get("step_ms_median"), ".2f"),
            _fmt(r.get("compile_s"), ".1f"),
            _fmt(r.get("first_step_s"), ".2f"),
            _fmt(r.get("startup_s"), ".1f"),
            _fmt(None if peak is None else peak / GIB, ".2f"),
            _fmt(None if xla is None else xla / 1e9, ".2f"),
            r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}".replace("|", "/"),
        ]
        lines.append(f"| {r['name']} | {r['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The figures the goals are stated in, from the cases that ran ok (None where one did not run).

    Each row: figure, torch_amp, torch_compile, flax, and ratio = Flax over the better PyTorch value
    (the higher for img/s, the lower for seconds and bytes).
    """
    ok = {r["name"]: r for r in records if r["status"] == "ok"}

    def get(name: str, key: str = "img_per_s") -> Any:
        return ok.get(name, {}).get(key)

    def row(figure: str, amp: Any, comp: Any, flax: Any, higher_is_better: bool = True) -> dict[str, Any]:
        torch = [v for v in (amp, comp) if v is not None]
        best = (max if higher_is_better else min)(torch, default=None)
        ratio = None if flax is None or not best else flax / best
        return {"figure": figure, "torch_amp": amp, "torch_compile": comp, "flax": flax, "ratio": ratio}

    batches = sorted({r["batch"] for r in records if r["framework"] != "e2e"}, reverse=True)
    rows = []
    for mode, what in (("train", "train"), ("infer", "inference")):
        for b in batches:
            amp, comp = (get(f"torch/{mode}/{v}_amp_bf16_cl/b{b}") for v in ("eager", "compile"))
            rows.append(row(f"{what} img/s, B={b}, bf16", amp, comp, get(f"flax/{mode}/bf16/b{b}")))
    # The cold and warm compilation-cache cases run at the plan's first batch size.
    b = next((r["batch"] for r in records if r["framework"] == "flax" and r.get("cache_dir")), None)
    flax = f"flax/train/bf16/b{b}"
    comp = get(f"torch/train/compile_amp_bf16_cl/b{b}", "compile_s")
    rows.append(row(f"cold compile of the train step, B={b} (s)", None, comp, get(flax, "compile_s"), False))
    warm = get(f"{flax}/warm-cache", "startup_s")
    rows.append(row("start-up with a warm compilation cache (s, process start to first step done)", None, None, warm))
    for r in records:
        pure = get(f"flax/train/bf16/b{r['batch']}")
        if r["framework"] == "e2e" and r["status"] == "ok" and pure:
            rows.append(row(f"real loop ({r['variant']}) / pure train step", None, None, r["img_per_s"] / pure))
    read_back, pure = get(flax, "img_per_s_read_back_each_step"), get(flax)
    ratio = read_back / pure if read_back and pure else None
    rows.append(row("train step with a host read of the loss after every step / without", None, None, ratio))
    for big in batches[:1]:
        names = (f"torch/train/eager_amp_bf16_cl/b{big}", f"flax/train/bf16/b{big}")
        amp, flax = (None if v is None else v / GIB for v in (get(n, "peak_mem_bytes") for n in names))
        rows.append(row(f"peak device memory, train B={big}, bf16 (GiB)", amp, None, flax, False))
    return rows


def fp32_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The CPU goals' figures: Flax fp32 img/s over PyTorch eager fp32 at its best thread count in this run."""
    ok = [r for r in records if r["status"] == "ok"]
    rows = []
    for mode, what in (("train", "train"), ("infer", "inference")):
        for b in sorted({r["batch"] for r in ok if r["mode"] == mode}):
            flax = next((r for r in ok if r["name"] == f"flax/{mode}/fp32/b{b}"), None)
            torch = [r for r in ok if r["framework"] == "torch" and r["variant"] == "eager_fp32"
                     and r["mode"] == mode and r["batch"] == b]  # fmt: skip
            best = max(torch, key=lambda r: r["img_per_s"], default=None)
            if flax is None or best is None:
                continue
            rows.append({
                "figure": f"{what} img/s, B={b}, fp32",
                "torch": {r.get("torch_threads"): r["img_per_s"] for r in torch},
                "best_threads": best.get("torch_threads"),
                "flax": flax["img_per_s"],
                "ratio": flax["img_per_s"] / best["img_per_s"],
            })  # fmt: skip
    return rows


def fp32_table(rows: list[dict[str, Any]]) -> str:
    """The fp32 rows as markdown."""
    lines = [
        "| figure | PyTorch eager fp32 (img/s by threads) | Flax | Flax / best PyTorch |",
        "|---|---|---|---|",
    ]
    for r in rows:
        torch = ", ".join(f"{_fmt(v)} ({t} thr)" for t, v in r["torch"].items())
        lines.append(f"| {r['figure']} | {torch} | {_fmt(r['flax'])} | {_fmt(r['ratio'], '.2f')} |")
    return "\n".join(lines)


def headline_table(rows: list[dict[str, Any]]) -> str:
    """The headline rows as markdown."""
    lines = [
        "| figure | PyTorch eager AMP | torch.compile | Flax | Flax / better PyTorch |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cells = (_fmt(r["torch_amp"]), _fmt(r["torch_compile"]), _fmt(r["flax"]), _fmt(r["ratio"], ".2f"))
        lines.append(f"| {r['figure']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """The whole report: the run's facts, the cases, the headline figures, the counts."""
    meta = result["meta"]
    out = [
        f"# Benchmark run {meta['date']}",
        "",
        f"- command: `{meta['command']}`",
        f"- host: {meta['host']}; devices: {', '.join(meta.get('devices') or ['?'])}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- step: {meta['step']}",
        f"- settings: {meta['settings']}",
        "",
        "## Cases",
        "",
        cases_table(result["cases"]),
        "",
        "## Headline figures (the goals are in bench/RESULTS.md)",
        "",
        headline_table(result["headline"]),
        "",
        "## fp32 against PyTorch eager at its best thread count (the CPU goals)",
        "",
        fp32_table(fp32_rows(result["cases"])),
        "",
        "## Counts (from the shapes; see bench/counting.py)",
        "",
        *(f"- {key}: {value}" for key, value in result["counts"].items()),
    ]
    if result.get("skipped_parts"):
        out += ["", "## Skipped parts", "", *(f"- {part}" for part in result["skipped_parts"])]
    return "\n".join(out) + "\n"
