"""`python -m bench.worker --spec JSON`: measure one case in this fresh process and print its result line."""

from __future__ import annotations

import argparse
import json

from bench.common import CaseSpec
from bench.runner import RESULT_PREFIX, run_case


def main(argv: list[str] | None = None) -> int:
    """Parse the spec, run it, print `BENCH_RESULT {json}` last; exit 0 even when the case failed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="CaseSpec fields as a JSON object")
    parser.add_argument("--spawn-time", type=float, default=None, help="time.time() when the parent spawned us")
    args = parser.parse_args(argv)
    spec = CaseSpec(**json.loads(args.spec))
    record = run_case(spec, args.spawn_time)
    print(RESULT_PREFIX + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
