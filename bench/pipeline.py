"""Input-pipeline throughput (no model): img/s from JPEG files and from the decoded cache, against workers.

    python bench/pipeline.py --out DIR [--images 384x512] [--size 256] [--workers 0,1,2,4,8,16]

Writes DIR/pipeline.json and DIR/pipeline.md. Fixture JPEGs (realistic size and content, ~40-60 KB at
384x512) are generated into --work (a temporary folder by default). Each measurement runs for at most
--seconds after a warm-up batch; the whole run is sized to finish in about two minutes on a 16-core host.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from train.data import Records, decode_image, make_eval_iter, make_train_iter
from train.data.cache import DecodedCache

FIXTURE_QUALITY = 90


def make_fixture(folder: Path, count: int, width: int, height: int, seed: int = 0) -> list[str]:
    """`count` photo-like JPEGs: smooth shading, shapes and sensor noise (not flat colour, not pure noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        paths.append(str(path))
        if path.exists():
            continue
        a, b, c = rng.uniform(0.2, 1.0, 3)
        base = np.dstack([a * 255 * xx / width, b * 255 * yy / height, c * 128 * (1 + np.sin(xx / 37 + yy / 53))])
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
            r = rng.uniform(10, width / 4)
            d.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        arr = np.asarray(img, np.float32) + rng.normal(0, 4, (height, width, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=FIXTURE_QUALITY)
    return paths


def rate(batches, batch_size: int, seconds: float, max_batches: int) -> dict:
    """img/s over up to max_batches batches or `seconds`, after one warm-up batch."""
    it = iter(batches)
    next(it)
    n, start = 0, time.perf_counter()
    for _ in itertools.islice(it, max_batches):
        n += 1
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    return {
        "batches": n,
        "images": n * batch_size,
        "seconds": round(elapsed, 3),
        "img_per_s": round(n * batch_size / elapsed, 1) if n else 0.0,
    }


def repeat(iterable):
    """Iterate a finite iterable over and over (the eval iterator has only count / batch batches)."""
    while True:
        yield from iterable


def decode_rate(paths: list[str], size: int, seconds: float) -> dict:
    """Single-thread decode_image (the per-core figure), no pipeline."""
    n, start = 0, time.perf_counter()
    for p in itertools.cycle(paths):
        decode_image(p, size)
        n += 1
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    return {"images": n, "seconds": round(elapsed, 3), "img_per_s": round(n / elapsed, 1)}


def machine() -> dict:
    """What ran the benchmark."""
    import grain
    import PIL

    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        model = names[0] if names else model
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "grain": getattr(grain, "__version__", "?"),
        "platform": platform.platform(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
    }


def run(args: argparse.Namespace) -> dict:
    width, height = (int(v) for v in args.images.split("x"))
    work = Path(args.work or tempfile.mkdtemp(prefix="pipeline-bench-"))
    t = time.perf_counter()
    paths = make_fixture(work / f"jpeg-{width}x{height}", args.count, width, height)
    sizes = [os.path.getsize(p) for p in paths]
    records = Records(tuple(paths), np.arange(len(paths), dtype=np.int32) % 18, tuple(paths))
    cores = os.cpu_count() or 1
    workers = [w for w in (int(v) for v in args.workers.split(",")) if w <= cores]
    result = {
        "machine": machine(),
        "fixture": {
            "count": len(paths),
            "width": width,
            "height": height,
            "mean_kb": round(float(np.mean(sizes)) / 1024, 1),
            "generate_s": round(time.perf_counter() - t, 1),
        },
        "image_size": args.size,
        "batch_size": args.batch,
        "runs": [],
    }
    result["decode_one_core"] = decode_rate(paths, args.size, args.seconds)
    print(f"decode on one core: {result['decode_one_core']['img_per_s']} img/s", flush=True)

    def record(source: str, kind: str, w: int, make) -> None:
        it = make()
        try:
            r = rate(it, args.batch, args.seconds, args.max_batches)
        finally:
            getattr(it, "close", lambda: None)()
        r.update(source=source, kind=kind, workers=w, per_process=round(r["img_per_s"] / max(w, 1), 1))
        result["runs"].append(r)
        print(f"{source:5} {kind:14} workers={w:2}: {r['img_per_s']:>9} img/s", flush=True)

    for w in workers:
        record(
            "jpeg",
            "train+augment",
            w,
            lambda w=w: make_train_iter(records, batch_size=args.batch, image_size=args.size, seed=0, num_workers=w),
        )
    shutil.rmtree(work / "cache", ignore_errors=True)  # time a fresh build
    t = time.perf_counter()
    DecodedCache.build(records, args.size, work / "cache", num_workers=max(workers))
    result["cache_build"] = {"seconds": round(time.perf_counter() - t, 2), "workers": max(workers)}
    for w in workers:
        record(
            "cache",
            "train",
            w,
            lambda w=w: make_train_iter(
                records,
                batch_size=args.batch,
                image_size=args.size,
                seed=0,
                augment=False,
                num_workers=w,
                cache_dir=work / "cache",
            ),
        )
        record(
            "cache",
            "train+augment",
            w,
            lambda w=w: make_train_iter(
                records, batch_size=args.batch, image_size=args.size, seed=0, num_workers=w, cache_dir=work / "cache"
            ),
        )
    record(
        "cache",
        "eval (repeated)",
        0,
        lambda: repeat(make_eval_iter(records, batch_size=args.batch, image_size=args.size, cache_dir=work / "cache")),
    )
    return result


def markdown(result: dict) -> str:
    """The results as a markdown table."""
    m, f = result["machine"], result["fixture"]
    lines = [
        f"## Pipeline throughput: {m['cores']} cores, {m['cpu']}",
        "",
        f"{m['date_utc']} UTC; python {m['python']}, numpy {m['numpy']}, Pillow {m['pillow']}, grain {m['grain']}; "
        f"`{m['command']}`",
        "",
        f"Fixture: {f['count']} JPEGs {f['width']}x{f['height']} (mean {f['mean_kb']} KB) -> "
        f"{result['image_size']}x{result['image_size']} uint8, batch {result['batch_size']}.",
        f"decode_image on one core (no pipeline): **{result['decode_one_core']['img_per_s']} img/s**; "
        f"decoded-cache build: {result['cache_build']['seconds']} s with {result['cache_build']['workers']} workers.",
        "",
        "| source | batches | workers | img/s | img/s per worker |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['source']} | {r['kind']} | {r['workers']} | {r['img_per_s']} | {r['per_process']} |"
        for r in result["runs"]
    ]
    lines.append("\nworkers=0: batches are decoded in the main process by grain's read threads.")
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
    for name, text in (("pipeline.json", json.dumps(result, indent=2)), ("pipeline.md", markdown(result))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
