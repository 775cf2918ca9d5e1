"""``python -m tools.bench.control worker|bare-server``: the helper processes the driver starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

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
    w.add_argument("--tls-root", help="mutual TLS: the material root (tools.bench.control.tlsmat); default plaintext")
    s = sub.add_parser("bare-server", help="the baseline: a bare grpc.aio server")
    s.add_argument("--listen", required=True)
    args = p.parse_args(list(argv))
    return worker_main(args) if args.role == "worker" else bare_server_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
