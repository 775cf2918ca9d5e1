"""``fabric-tool bench``: the benchmark suite's entry point.

Benchmarks register in :data:`BENCHMARKS` (name -> runner taking the repeat count and returning
``{operation: {figure: value}}``); every figure comparing us with a baseline has ``ratio`` in its
key so CI can gate on them. Results print as a table on stdout (progress goes to stderr) and, with
``--json FILE``, as ``{benchmark: {operation: {...}}}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

_log = logging.getLogger(__name__)

Results = dict[str, dict[str, float]]


@dataclass(frozen=True)
class Benchmark:
    run: Callable[[int], Results]
    render: Callable[[Results], str]
    help: str


def _netlink() -> Benchmark:
    from tools import bench_netlink  # late: imports pyroute2 and needs root only when run

    return Benchmark(bench_netlink.run, bench_netlink.render, "10,000 routes/FDB/neighbours vs ip/bridge -batch")


BENCHMARKS: dict[str, Callable[[], Benchmark]] = {"netlink": _netlink}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fabric-tool bench",
        description="Run benchmarks side by side with their baselines.",
        epilog="example: fabric-tool bench netlink --repeat 5 --json /tmp/bench.json",
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {sorted(BENCHMARKS)})"
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds per benchmark (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)} on the command line; known: {', '.join(BENCHMARKS)}")
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    out: dict[str, Results] = {}
    for name in args.names or list(BENCHMARKS):
        bench = BENCHMARKS[name]()
        results = bench.run(args.repeat)
        out[name] = results
        print(f"== {name} ({args.repeat} rounds, entries/s)")
        print(bench.render(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2, sort_keys=True)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
