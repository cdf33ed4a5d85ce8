"""Input-pipeline throughput (no model): img/s from JPEG files and from the decoded cache, against workers.

    python bench/pipeline.py --out DIR [--images 384x512] [--size 256] [--workers 0,1,2,4,8,16]

Writes DIR/pipeline.json and DIR/pipeline.md. Photo-like fixture JPEGs (bench/fixture.py, ~40 KB at
384x512) are generated into --work (a temporary folder by default). Each measurement runs for at most
--seconds after a warm-up batch; the whole run is sized to finish in about two minutes on a 16-core host.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from bench.common import NUM_CLASSES, run_meta
from bench.fixture import write_dataset
from train.data import Records, decode_image, make_eval_iter, make_train_iter
from train.data.cache import DecodedCache
from train.logging_utils import atomic_write_text


def rate(items: Iterable[Any], per_item: int, seconds: float, max_items: int) -> dict[str, Any]:
    """img/s over up to `max_items` items (batches of `per_item` images) or `seconds`, after one warm-up item."""
    it = iter(items)
    next(it)
    n, start = 0, time.perf_counter()
    for _ in itertools.islice(it, max_items):
        n += 1
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    return {"images": n * per_item, "seconds": round(elapsed, 3), "img_per_s": round(n * per_item / elapsed, 1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of the run, as one JSON-able dict."""
    width, height = (int(v) for v in args.images.split("x"))
    work = Path(args.work or tempfile.mkdtemp(prefix="pipeline-bench-"))
    t = time.perf_counter()
    paths = write_dataset(work / f"jpeg-{width}x{height}", args.count, height, width)[: args.count]
    records = Records(tuple(paths), np.arange(len(paths), dtype=np.int32) % NUM_CLASSES, tuple(paths))
    workers = [w for w in (int(v) for v in args.workers.split(",")) if w <= (os.cpu_count() or 1)]
    mean_kb = float(np.mean([os.path.getsize(p) for p in paths])) / 1024
    result: dict[str, Any] = {
        "machine": run_meta(shlex.join([Path(sys.executable).name, *sys.argv]), ("numpy", "pillow", "grain")),
        "fixture": {"count": len(paths), "width": width, "height": height, "mean_kb": round(mean_kb, 1)},
        "image_size": args.size,
        "batch_size": args.batch,
        "runs": [],
    }
    result["fixture"]["generate_s"] = round(time.perf_counter() - t, 1)
    decoded = (decode_image(p, args.size) for p in itertools.cycle(paths))
    result["decode_one_core"] = rate(decoded, 1, args.seconds, sys.maxsize)
    print(f"decode on one core: {result['decode_one_core']['img_per_s']} img/s", flush=True)

    def record(source: str, kind: str, w: int, batches: Iterable[Any]) -> None:
        try:
            r = rate(batches, args.batch, args.seconds, args.max_batches)
        finally:
            getattr(batches, "close", lambda: None)()
        r.update(source=source, kind=kind, workers=w, per_process=round(r["img_per_s"] / max(w, 1), 1))
        result["runs"].append(r)
        print(f"{source:5} {kind:14} workers={w:2}: {r['img_per_s']:>9} img/s", flush=True)

    common = {"batch_size": args.batch, "image_size": args.size}
    for w in workers:
        record("jpeg", "train+augment", w, make_train_iter(records, seed=0, num_workers=w, **common))
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # time a fresh build
    t = time.perf_counter()
    DecodedCache.build(records, args.size, cache, num_workers=max(workers))
    result["cache_build"] = {"seconds": round(time.perf_counter() - t, 2), "workers": max(workers)}
    for w in workers:
        for kind, augment in (("train", False), ("train+augment", True)):
            batches = make_train_iter(records, seed=0, augment=augment, num_workers=w, cache_dir=cache, **common)
            record("cache", kind, w, batches)
    # The eval iterator has only count / batch batches: repeat it.
    batches = itertools.chain.from_iterable(itertools.repeat(make_eval_iter(records, cache_dir=cache, **common)))
    record("cache", "eval (repeated)", 0, batches)
    return result


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown table."""
    m, f = result["machine"], result["fixture"]
    lines = [
        f"## Pipeline throughput: {m['host']}",
        "",
        f"{m['date']}; {', '.join(f'{k} {v}' for k, v in m['versions'].items())}; `{m['command']}`",
        "",
        f"Fixture: {f['count']} JPEGs {f['width']}x{f['height']} (mean {f['mean_kb']} KB) -> "
        f"{result['image_size']}x{result['image_size']} uint8, batch {result['batch_size']}.",
        f"decode_image on one core (no pipeline): **{result['decode_one_core']['img_per_s']} img/s**; "
        f"decoded-cache build: {result['cache_build']['seconds']} s with {result['cache_build']['workers']} workers.",
        "",
        "| source | batches | workers | img/s | img/s per worker |",
        "|---|---|---|---|---|",
        *(
            f"| {r['source']} | {r['kind']} | {r['workers']} | {r['img_per_s']} | {r['per_process']} |"
            for r in result["runs"]
        ),
        "",
        "workers=0: batches are decoded in the main process by grain's read threads.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Run the benchmark and write pipeline.json and pipeline.md into --out."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for pipeline.json and pipeline.md")
    parser.add_argument("--work", default=None, help="folder for the fixture JPEGs and cache (default: a temp dir)")
    parser.add_argument("--images", default="384x512", help="fixture WIDTHxHEIGHT")
    parser.add_argument("--count", type=int, default=512, help="fixture images")
    parser.add_argument("--size", type=int, default=256, help="output image size")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--workers", default="0,1,2,4,8,16", help="worker counts (those above the core count are skipped)"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--max-batches", type=int, default=200)
    args = parser.parse_args()
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "pipeline.json", json.dumps(result, indent=2))
    atomic_write_text(out / "pipeline.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
