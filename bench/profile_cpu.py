"""CPU inference profile, Flax vs PyTorch eager side by side: wall time per step and where the time goes.

`python -m bench.profile_cpu [--shapes 32x32,256x8] [--torch-threads 2,1] [--fold both] [--breakdown]`

Each (framework, variant) runs in its own process, one after the other, in rounds (`--rounds`), so the ratios
of one round share the machine's load (the load average is recorded with every measurement). Per-op time:
Flax from a `jax.profiler` trace (XLA:CPU emits one event per thunk; each is attributed to a category through
the optimized HLO: its opcode, its fused computation, its operands, its op_name metadata), with XLA's own cost
analysis of the compiled step; PyTorch from `torch.profiler` (self CPU time per aten op). Both sides run the
same work as bench/flax_cases.py's inference case: a synthetic uint8 batch normalised inside the step, logits
with the running statistics, fp32. Notes and results: bench/NOTES.md section 6, bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench.common import DATA_SEED, NUM_CLASSES
from darknet_arch import ARCHS

TRACE_STEPS = 3  # steps inside the profiler (per-op figures are per step: totals / TRACE_STEPS)
TOP_TORCH_OPS = 8  # aten ops listed per PyTorch run
_RESULT_PREFIX = "PROFILE_RESULT "
# Top-level HLO instruction: `%name = type opcode(operands), ...` (ROOT optional).
_HLO_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\((.*?)\)(?:, |$)(.*)$")
_CALLS = re.compile(r"calls=%([\w.-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _time_windows(run: Callable[[], None], steps: int, repeats: int) -> list[float]:
    """Seconds per step of `repeats` windows of `steps` steps (`run` does one step and waits for it)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        out.append((time.perf_counter() - t0) / steps)
    return out


def _hlo_index(hlo_text: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Entry instructions by name (opcode, operands, called computation, op_name) and computation bodies."""
    computations: dict[str, list[str]] = {}
    current = None
    entry = None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            if line.startswith("ENTRY"):
                entry = current
            computations[current] = []
        elif current is not None:
            computations[current].append(line)
    instrs = {}
    for line in computations.get(entry, []):
        m = _HLO_INSTR.match(line)
        if not m:
            continue
        name, _, opcode, operands, rest = m.groups()
        calls = _CALLS.search(rest)
        op_name = _OP_NAME.search(rest)
        instrs[name] = {
            "opcode": opcode,
            "operands": re.findall(r"%([\w.-]+)", operands),
            "calls": calls.group(1) if calls else None,
            "op_name": op_name.group(1) if op_name else "",
        }
    return instrs, {k: "\n".join(v) for k, v in computations.items()}


def _categorise(instrs: dict[str, dict[str, Any]], bodies: dict[str, str]) -> dict[str, str]:
    """Category of every entry instruction (what a thunk of that name spends its time on)."""
    weight_only: set[str] = {n for n, i in instrs.items() if i["opcode"] == "parameter" and "v[" in i["op_name"]}
    for name, ins in instrs.items():  # HLO text is in def-before-use order, so one pass suffices
        if ins["opcode"] != "parameter" and ins["operands"] and all(o in weight_only for o in ins["operands"]):
            weight_only.add(name)
    cats = {}
    for name, ins in instrs.items():
        body = bodies.get(ins["calls"] or "", "")
        op_name = ins["op_name"]
        if ins["opcode"] == "convolution" or " convolution(" in body:
            cat = "conv (XLA convolution)"
        elif ins["opcode"] == "dot" or " dot(" in body:
            cat = "matmul (small-map convs as im2col, head)"
        elif name in weight_only:
            cat = "weight prep: BN scale/shift" if "/bn/" in op_name else "weight prep: small-map kernel slice/concat"
        elif "branch_0_fun" in op_name:  # conv.py's matmul branch of lax.platform_dependent
            cat = "im2col: pad/slice/concat of activations"
        elif ins["opcode"] in ("parameter", "constant", "bitcast", "tuple", "get-tuple-element"):
            cat = "no-op"
        else:
            cat = "elementwise: normalise, BN apply, LeakyReLU, residual add, pool"
        cats[name] = cat
    return cats


def _trace_breakdown(trace_dir: str, cats: dict[str, str], layers: dict[str, str], steps: int) -> dict[str, Any]:
    """Per-step thunk time by category from the trace XLA:CPU wrote (one complete event per thunk)."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    by_cat: collections.Counter[str] = collections.Counter()
    by_thunk: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in cats:
            by_cat[cats[e["name"]]] += e.get("dur", 0.0) / 1e3 / steps
            by_thunk[e["name"]] += e.get("dur", 0.0) / 1e3 / steps
    top = [
        {"thunk": n, "layer": layers.get(n, ""), "category": cats[n], "ms": ms} for n, ms in by_thunk.most_common(10)
    ]
    return {"thunk_ms_by_category": dict(by_cat.most_common()), "thunk_ms_total": sum(by_cat.values()), "top": top}


def run_flax(arch: str, image_size: int, batch: int, fold: bool, steps: int, repeats: int, breakdown: bool) -> dict:
    """Time (and optionally trace) Flax inference with the running statistics, unfolded or BN-folded."""
    import jax
    import numpy as np

    from bench.flax_cases import xla_cost
    from train.state import create_model
    from train.steps import normalize

    config = ARCHS[arch]
    model = create_model(config, NUM_CLASSES, "fp32")
    rng = np.random.default_rng(DATA_SEED)
    images = jax.device_put(rng.integers(0, 256, (batch, image_size, image_size, config.in_channels), np.uint8))
    init = jax.jit(lambda: model.init(jax.random.key(DATA_SEED, impl="unsafe_rbg"), normalize(images[:1])))
    variables = init()
    # Random running statistics, so that folding has non-trivial mean/var/scale/bias to fold.
    leaves, treedef = jax.tree_util.tree_flatten(variables["batch_stats"])
    stats = [jax.numpy.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype) for x in leaves]
    variables = {**variables, "batch_stats": jax.tree_util.tree_unflatten(treedef, stats)}
    if fold:
        from flax_darknet import fold_for_inference

        model, variables = fold_for_inference(model, variables)

    def infer(v: Any, x: jax.Array) -> jax.Array:
        return model.apply(v, normalize(x), train=False)

    t0 = time.perf_counter()
    compiled = jax.jit(infer).lower(variables, images).compile()
    compile_s = time.perf_counter() - t0
    cost = xla_cost(compiled)

    def run() -> None:
        jax.block_until_ready(compiled(variables, images))

    run()
    run()
    per_step = _time_windows(run, steps, repeats)
    record: dict[str, Any] = {
        "compile_s": compile_s,
        "step_ms": [1e3 * t for t in per_step],
        "xla_gflop": cost.get("flops", 0.0) / 1e9,
        "xla_gb_accessed": cost.get("bytes accessed", 0.0) / 1e9,
    }
    if breakdown:
        instrs, bodies = _hlo_index(compiled.as_text())
        # The module path of each thunk's op ("Darknet53/conv1/conv/conv_general_dilated" -> "conv1/conv").
        layers = {n: "/".join(i["op_name"].split("/")[2:4]) for n, i in instrs.items()}
        with tempfile.TemporaryDirectory() as trace_dir:
            jax.profiler.start_trace(trace_dir)
            for _ in range(TRACE_STEPS):
                run()
            jax.profiler.stop_trace()
            record["breakdown"] = _trace_breakdown(trace_dir, _categorise(instrs, bodies), layers, TRACE_STEPS)
        record["breakdown"]["thunk_counts"] = dict(collections.Counter(_categorise(instrs, bodies).values()))
    return record


def run_fold_ab(arch: str, image_size: int, batch: int, pairs: int) -> dict[str, Any]:
    """Unfolded and BN-folded inference compiled in one process and timed step by step, alternating.

    On a shared machine the load drifts between processes; alternating single steps lets each pair see the same
    load, and the median of the per-pair ratios is the figure.
    """
    import jax
    import numpy as np

    from flax_darknet import fold_for_inference
    from train.state import create_model
    from train.steps import normalize

    config = ARCHS[arch]
    model = create_model(config, NUM_CLASSES, "fp32")
    rng = np.random.default_rng(DATA_SEED)
    images = jax.device_put(rng.integers(0, 256, (batch, image_size, image_size, config.in_channels), np.uint8))
    variables = jax.jit(lambda: model.init(jax.random.key(DATA_SEED, impl="unsafe_rbg"), normalize(images[:1])))()
    runs = {}
    for name, (m, v) in (("unfolded", (model, variables)), ("folded", fold_for_inference(model, variables))):
        compiled = jax.jit(lambda v, x, m=m: m.apply(v, normalize(x), train=False)).lower(v, images).compile()
        runs[name] = (compiled, v)
        jax.block_until_ready(compiled(v, images))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(pairs):
        for name, (compiled, v) in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(v, images))
            times[name].append(time.perf_counter() - t0)
    ratios = [u / f for u, f in zip(times["unfolded"], times["folded"], strict=True)]
    return {
        "step_ms": {k: 1e3 * statistics.median(t) for k, t in times.items()},
        "speedup_median": statistics.median(ratios),
        "speedup_quartiles": statistics.quantiles(ratios, n=4),
    }


def run_torch(arch: str, image_size: int, batch: int, threads: int, steps: int, repeats: int, breakdown: bool) -> dict:
    """Time (and optionally profile) PyTorch eager fp32 inference with `threads` intra-op threads."""
    import torch

    from torch_ref import Darknet53
    from train.torch import normalize

    torch.set_num_threads(threads)
    torch.manual_seed(DATA_SEED)
    config = ARCHS[arch]
    model = Darknet53(num_classes=NUM_CLASSES, config=config).eval()
    gen = torch.Generator().manual_seed(DATA_SEED)
    images = torch.randint(
        0, 256, (batch, config.in_channels, image_size, image_size), dtype=torch.uint8, generator=gen
    )

    def run() -> None:
        with torch.no_grad():
            model(normalize(images))

    run()
    run()
    per_step = _time_windows(run, steps, repeats)
    record: dict[str, Any] = {"step_ms": [1e3 * t for t in per_step], "threads": torch.get_num_threads()}
    if breakdown:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(TRACE_STEPS):
                run()
        ops = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)
        record["breakdown"] = {
            "self_ms_total": sum(a.self_cpu_time_total for a in ops) / 1e3 / TRACE_STEPS,
            "top": [{"op": a.key, "ms": a.self_cpu_time_total / 1e3 / TRACE_STEPS} for a in ops[:TOP_TORCH_OPS]],
        }
    return record


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    common = {k: spec[k] for k in ("arch", "image_size", "batch", "steps", "repeats", "breakdown")}
    if spec["framework"] == "flax":
        return run_flax(fold=spec["fold"], **common)
    return run_torch(threads=spec["threads"], **common)


def _spawn(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Run one spec in a fresh process; its record, with the load average before it started."""
    load = os.getloadavg()[0]
    cmd = [sys.executable, "-m", "bench.profile_cpu", "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        return {**spec, "load1": load, "error": proc.stderr[-2000:]}
    return {**spec, "load1": load, **json.loads(lines[-1][len(_RESULT_PREFIX) :])}


def _label(r: dict[str, Any]) -> str:
    if r["framework"] == "flax":
        return "flax " + ("BN folded" if r["fold"] else "unfolded") + (f" [{r['tag']}]" if r.get("tag") else "")
    return f"torch eager, {r['threads']} thread(s)"


def _report(records: list[dict[str, Any]]) -> str:
    """Markdown: one table per (shape, round) with img/s and ratios, then the breakdowns."""
    out = []
    groups: dict[tuple, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in records:
        groups[(r["image_size"], r["batch"], r["round"])].append(r)
    for (size, batch, rnd), rs in groups.items():
        out.append(f"\n{size} px, batch {batch}, round {rnd}\n")
        out.append("| run | load (1 min) | step ms (median; windows) | img/s | compile s | XLA GFLOP / GB |")
        out.append("|---|---|---|---|---|---|")
        rates = {}
        for r in rs:
            if "error" in r:
                out.append(f"| {_label(r)} | {r['load1']:.1f} | failed: {r['error'][-200:]!r} | | | |")
                continue
            med = statistics.median(r["step_ms"])
            rates[_label(r)] = 1e3 * batch / med
            windows = ", ".join(f"{t:.1f}" for t in r["step_ms"])
            xla = f"{r['xla_gflop']:.1f} / {r['xla_gb_accessed']:.2f}" if "xla_gflop" in r else "-"
            comp = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
            out.append(
                f"| {_label(r)} | {r['load1']:.1f} | {med:.1f} ({windows}) | {rates[_label(r)]:.1f} | {comp} | {xla} |"
            )
        best_torch = max((v for k, v in rates.items() if k.startswith("torch")), default=None)
        if best_torch:
            for k, v in rates.items():
                if k.startswith("flax"):
                    out.append(f"\n{k} / best torch eager: **{v / best_torch:.2f}**")
        for r in rs:
            b = r.get("breakdown")
            if not b:
                continue
            if r["framework"] == "flax":
                out.append(f"\n{_label(r)}: thunk time per step {b['thunk_ms_total']:.1f} ms (summed over threads)\n")
                out.append("| category | ms/step | share | thunks |")
                out.append("|---|---|---|---|")
                for cat, ms in b["thunk_ms_by_category"].items():
                    share = ms / b["thunk_ms_total"]
                    out.append(f"| {cat} | {ms:.2f} | {share:.0%} | {b['thunk_counts'].get(cat, 0)} |")
                top = "; ".join(f"{t['thunk']} ({t['layer']}) {t['ms']:.2f} ms" for t in b["top"][:5])
                out.append(f"\ntop thunks: {top}")
            else:
                out.append(f"\n{_label(r)}: aten self CPU time per step {b['self_ms_total']:.1f} ms\n")
                out.append("| aten op | ms/step |")
                out.append("|---|---|")
                out.extend(f"| {t['op']} | {t['ms']:.2f} |" for t in b["top"])
    return "\n".join(out)


def _shape(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected SIZExBATCH such as 32x32 or 256x8, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_cpu", description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--shapes", default="32x32,256x8", help="comma-separated SIZExBATCH (default 32x32,256x8)")
    p.add_argument("--arch", default="darknet53", choices=sorted(ARCHS))
    p.add_argument("--torch-threads", default="2,1", help="PyTorch intra-op thread counts to run (default 2,1)")
    p.add_argument("--fold", default="both", choices=("no", "yes", "both"), help="Flax with BatchNorm folded")
    p.add_argument("--xla-flags", action="append", default=[], help="extra Flax run with XLA_FLAGS=VALUE (repeat)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows (the figure is the median)")
    p.add_argument("--rounds", type=int, default=1, help="times to run the whole set, one after the other")
    p.add_argument("--breakdown", action="store_true", help="per-op profile (jax.profiler, torch.profiler)")
    p.add_argument("--out", help="also write the records as JSON here")
    p.add_argument("--fold-ab", type=int, metavar="PAIRS", help="only: unfolded vs folded, alternating, in-process")
    args = p.parse_args(argv)
    if args.fold_ab:
        for size, batch in [_shape(t) for t in args.shapes.split(",")]:
            load = os.getloadavg()[0]
            r = run_fold_ab(args.arch, size, batch, args.fold_ab)
            q1, _, q3 = r["speedup_quartiles"]
            ms = r["step_ms"]
            print(
                f"{size} px b{batch}, load {load:.1f}, {args.fold_ab} alternating pairs: unfolded {ms['unfolded']:.1f} "
                f"ms, folded {ms['folded']:.1f} ms (medians); unfolded/folded per pair: median "
                f"{r['speedup_median']:.3f} (quartiles {q1:.3f}-{q3:.3f})"
            )
        return 0
    if args.worker:
        print(_RESULT_PREFIX + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return 0
    try:
        shapes = [_shape(s) for s in args.shapes.split(",")]
        threads = [int(t) for t in args.torch_threads.split(",") if t]
    except (argparse.ArgumentTypeError, ValueError) as e:
        p.error(str(e))
    folds = {"no": [False], "yes": [True], "both": [False, True]}[args.fold]
    records = []
    for rnd in range(1, args.rounds + 1):
        for size, batch in shapes:
            base = {
                "arch": args.arch,
                "image_size": size,
                "batch": batch,
                "steps": args.steps,
                "repeats": args.repeats,
                "breakdown": args.breakdown,
                "round": rnd,
            }
            runs = [({**base, "framework": "flax", "fold": f}, {}) for f in folds]
            runs += [
                ({**base, "framework": "flax", "fold": folds[-1], "tag": fl}, {"XLA_FLAGS": fl})
                for fl in args.xla_flags
            ]
            runs += [({**base, "framework": "torch", "threads": t}, {}) for t in threads]
            for spec, env in runs:
                records.append(_spawn(spec, env))
                print(f"{_label(records[-1])} {size}px b{batch} round {rnd}: done", file=sys.stderr, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    print(_report(records))
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
