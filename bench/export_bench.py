"""CPU inference of the exported artefacts beside the models they came from, in one process, side by side.

python -m bench.export_bench [--image-size 256] [--batches 1 8] [--steps 3] [--rounds 5] [--torch-threads N]
    [--skip RUNTIME ...] [--out DIR]

Runtimes: the exported JAX program (porting.export, `Exported.call`, as darknet53-serve-predict runs it),
onnxruntime on the exported ONNX, the Flax model under jax.jit, torch_ref eager and torch.compile. Every one
takes the same uint8 NHWC batch and includes the preprocessing (x/255, mean/std) and the softmax, as the
artefacts do. Windows are interleaved: each round times every runtime once, so a change in the machine's load
hits all of them alike; the figure is the median round. Each runtime's logits are checked against the Flax
model's on the timed batch before timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import DATA_SEED, NUM_CLASSES, run_meta, time_windows
from darknet_arch import ARCHS

RUNTIMES = ("jax_export", "onnxruntime", "flax_jit", "torch_eager", "torch_compile")
DISTRIBUTIONS = ("jax", "jaxlib", "flax", "torch", "onnx", "onnxruntime", "numpy")
DEFAULT_IMAGE_SIZE, DEFAULT_BATCHES = 256, (1, 8)


def build_runtimes(arch: str, image_size: int, skip: Sequence[str], workdir: Path) -> tuple[dict[str, Any], dict]:
    """{runtime: images -> logits (numpy)} over one set of random weights, and the export's sidecars."""
    import jax
    import onnxruntime as ort
    import torch

    from porting.export import export, flax_logits, read_weights, serving_preprocessing, torch_serving_module
    from porting.files import write_torch_file
    from torch_ref import Darknet53

    torch.manual_seed(DATA_SEED)
    config = ARCHS[arch]
    pt = workdir / "weights.pt"
    write_torch_file(pt, Darknet53(num_classes=NUM_CLASSES, config=config).state_dict(),
                     {"num_classes": NUM_CLASSES, "leaky_slope": config.leaky_slope})  # fmt: skip
    record = {"image_size": image_size}
    result = export(pt, workdir / "out", targets=("jax", "onnx"), platforms=("cpu",), arch=arch, preprocessing=record)
    weights = read_weights(pt, arch=arch, preprocessing=record)
    pre, _, _ = serving_preprocessing(weights)
    runtimes: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    program = jax.export.deserialize(bytearray(result.artefacts["jax"].read_bytes()))
    runtimes["jax_export"] = lambda x: np.asarray(program.call(x)[0])
    session = ort.InferenceSession(str(result.artefacts["onnx"]), providers=["CPUExecutionProvider"])
    runtimes["onnxruntime"] = lambda x: session.run(["logits"], {"images": x})[0]
    runtimes["flax_jit"] = flax_logits(weights, pre)  # np.asarray inside: the result is on the host
    module = torch_serving_module(weights, pre)

    def torch_runner(net: Any) -> Callable[[np.ndarray], np.ndarray]:
        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return net(torch.from_numpy(x))[0].numpy()

        return run

    runtimes["torch_eager"] = torch_runner(module)
    runtimes["torch_compile"] = torch_runner(torch.compile(module, dynamic=False))  # one graph per batch size
    return {k: v for k, v in runtimes.items() if k not in skip}, {t: s for t, s in result.sidecars.items()}


def measure_all(runtimes: dict[str, Any], batch: int, image_size: int, steps: int, rounds: int) -> dict[str, dict]:
    """Per runtime: first call (compile) seconds, max |logits - Flax|, and interleaved windows of `steps` calls."""
    images = np.random.default_rng(DATA_SEED).integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    records: dict[str, dict] = {}
    logits = {}
    for name, run in runtimes.items():
        t0 = time.perf_counter()
        logits[name] = np.asarray(run(images), np.float64)
        records[name] = {"first_call_s": time.perf_counter() - t0, "window_s_per_call": []}
        run(images)  # one warm-up call after the first
    ref = logits.get("flax_jit")
    for name, rec in records.items():
        diff = None if ref is None else float(np.max(np.abs(logits[name] - ref)) / np.max(np.abs(ref)))
        rec["relative_diff_vs_flax"] = diff
    for _ in range(rounds):
        for name, run in runtimes.items():

            def calls(n: int, run: Any = run) -> None:
                for _ in range(n):
                    run(images)  # numpy out: every call has finished when it returns

            records[name]["window_s_per_call"] += time_windows(calls, lambda: None, 0, steps, 1)
    for rec in records.values():
        rec["s_per_call_median"] = statistics.median(rec["window_s_per_call"])
        rec["img_per_s"] = batch / rec["s_per_call_median"]
    return records


def markdown(results: dict[int, dict[str, dict]], meta: dict[str, Any]) -> str:
    """The side-by-side table: one row per runtime, img/s at each batch size."""
    batches = sorted(results)
    cols = " | ".join(f"b{b} img/s | b{b} ms/call" for b in batches)
    head = f"| runtime | {cols} | first call s | rel. diff vs Flax |"
    lines = [head, "|---" * (1 + 2 * len(batches) + 2) + "|"]
    for name in results[batches[0]]:
        cells = [f"{results[b][name]['img_per_s']:,.2f} | {1e3 * results[b][name]['s_per_call_median']:,.1f}"
                 for b in batches]  # fmt: skip
        first = " / ".join(f"{results[b][name]['first_call_s']:.1f}" for b in batches)
        diffs = [results[b][name]["relative_diff_vs_flax"] for b in batches]
        diff = " / ".join("-" if d is None else f"{d:.1e}" for d in diffs)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {first} | {diff} |")
    where = f"{meta['date']}; {meta['host']}; torch threads: {meta['torch_threads']}"
    return f"{where}\n`{meta['command']}`\n\n" + "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.export_bench", description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=tuple(ARCHS), default="darknet53")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    p.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    p.add_argument("--steps", type=int, default=3, help="calls per timed window")
    p.add_argument("--rounds", type=int, default=5, help="interleaved windows per runtime; the median is reported")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--skip", nargs="*", choices=RUNTIMES, default=[], help="runtimes to leave out")
    p.add_argument("--out", default=None, help="folder for results.json and results.md (default: print only)")
    args = p.parse_args(argv)
    if min(*args.batches, args.steps, args.rounds, args.torch_threads or 1) < 1 or args.torch_threads == 0:
        p.error("--batches, --steps, --rounds and --torch-threads must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench.export_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = run_meta(command.strip(), DISTRIBUTIONS)
    import torch

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    meta["torch_threads"] = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        runtimes, sidecars = build_runtimes(args.arch, args.image_size, args.skip, Path(tmp))
        meta["export_s"] = time.perf_counter() - t0
        results = {b: measure_all(runtimes, b, args.image_size, args.steps, args.rounds) for b in args.batches}
    meta["export_checks"] = {t: s["check"] for t, s in sidecars.items()}
    table = markdown(results, meta)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        (out / "results.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
