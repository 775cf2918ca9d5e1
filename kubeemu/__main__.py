"""``python -m kubeemu``: one emulated cluster's API server as a process (what the lab starts).

Prints ``kubeemu NAME listening on URL`` once serving (and writes the URL to --ready-file),
then runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path

from kubeemu.server import EmuServer

_log = logging.getLogger(__name__)

#: The collector's first threshold (Python's default: 700 allocations). A request allocates
#: hundreds of containers (its JSON decoded, copied, encoded) and the store keeps thousands of
#: objects, so the default ran a collection every few requests: 25-37 us of CPU per pod create
#: (gc callbacks, 3000-6000 pods in the store), 7-15 us at 10,000. Nearly everything here is freed
#: by reference counting; the collector only finds the rare cycle, a little later.
GC_THRESHOLD0 = 10000


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6); port 0 picks an ephemeral port."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen {value!r}: expected HOST:PORT, e.g. 127.0.0.1:6443")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kubeemu", description="In-memory Kubernetes API server emulator "
                                "(lab and tests only)")
    p.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 0), help="HOST:PORT (default 127.0.0.1:0)")
    p.add_argument("--name", default="kubeemu", help="cluster name (logs, stats)")
    p.add_argument("--service-cidr", default="10.96.0.0/12",
                   help="service CIDR(s) for ClusterIP allocation, comma-separated for dual stack")
    p.add_argument("--log-size", type=int, default=10000, help="watch log length (older revisions get 410)")
    p.add_argument("--bookmark-interval", type=float, default=5.0, help="seconds between watch BOOKMARKs")
    p.add_argument("--graceful-pods", action="store_true",
                   help="bound pods wait for their kubelet on delete (deletionTimestamp + grace), as upstream")
    p.add_argument("--kubelet-host", default="127.0.0.1",
                   help="where pods/log and pods/exec reach a node's kubelet (on its daemonEndpoints port); the "
                   "lab's stand-in for the apiserver-to-kubelet tunnel, since nodes' InternalIPs live in lab "
                   "network namespaces (default 127.0.0.1)")
    p.add_argument("--ready-file", type=Path, help="write the server URL here once listening")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


async def _serve(args: argparse.Namespace) -> None:
    server = EmuServer(args.name, tuple(c for c in args.service_cidr.split(",") if c.strip()),
                       log_size=args.log_size, bookmark_interval=args.bookmark_interval,
                       graceful_pods=args.graceful_pods, kubelet_host=args.kubelet_host)
    url = await server.start(*args.listen)
    if args.ready_file:
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(url + "\n")
        tmp.replace(args.ready_file)
    print(f"kubeemu {args.name} listening on {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve(args))
    except ValueError as e:  # bad --service-cidr and the like
        print(f"kubeemu: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
