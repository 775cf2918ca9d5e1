"""``python -m tools.bench.control worker|bare-server|profiled-reflector``: the helper processes the driver starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tools.bench import common as bc
from tools.bench.control.agents import worker_main
from tools.bench.control.bare import bare_server_main

_log = logging.getLogger(__name__)


# -- entry point of the helper processes -----------------------------------------------------


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.control", description="helper processes of bench control")
    sub = p.add_subparsers(dest="role", required=True)
    w = sub.add_parser("worker", help="light agents (or the joiner) for the control benchmark")
    w.add_argument("--target", required=True)
    w.add_argument("--mode", choices=("fabric", "bare"), required=True)
    w.add_argument("--shape", choices=bc.CONTROL_SHAPES, required=True)
    w.add_argument("--n", type=int, required=True, help="agents of the shape (the joiner's index is above)")
    w.add_argument("--first", type=int, required=True)
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--joiner", action="store_true")
    w.add_argument("--spread", action="store_true",
                   help="--target lists several servers (comma-separated, one per fabric-relay): agent i uses the "
                   "(i mod K)-th")  # fmt: skip
    w.add_argument("--tls-root", help="mutual TLS: the material root (tools.bench.control.tlsmat); default plaintext")
    s = sub.add_parser("bare-server", help="the baseline: a bare grpc.aio server")
    s.add_argument("--listen", required=True)
    r = sub.add_parser("profiled-reflector", help="fabric-reflector under cProfile (FABRIC_BENCH_PROFILE)")
    r.add_argument("--out", required=True, help="directory of the .prof files")
    r.add_argument("--label", required=True, help="file name prefix (shape and N)")
    r.add_argument("reflector_args", nargs=argparse.REMAINDER, help="-- then fabric-reflector's arguments")
    args = p.parse_args(list(argv))
    if args.role == "profiled-reflector":
        from tools.bench.control.profiled import profiled_main

        rest = args.reflector_args[1:] if args.reflector_args[:1] == ["--"] else args.reflector_args
        return profiled_main(Path(args.out), args.label, rest)
    return worker_main(args) if args.role == "worker" else bare_server_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
