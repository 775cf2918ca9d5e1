"""A minimal TCP request/response rate tool (netperf TCP_RR's idea) for the datapath benchmark.

``python -m tools.bench.rr server ADDR PORT`` answers every 1-byte request of one connection with
1 byte, then exits when the client closes. ``python -m tools.bench.rr client ADDR PORT SECONDS``
connects (retrying while the server starts), does 0.2 s of warm-up transactions, then counts
transactions for SECONDS and prints the rate per second as its last line.

One transaction = one send and one blocking receive on each side, Nagle off, so the rate is the
inverse of the round trip through the datapath plus two Python loop iterations: the Python cost
is the same on every path compared, so same-run ratios stay meaningful (they understate the
differences between paths). The datapath benchmark pins both ends to one vCPU with ``taskset``:
cross-vCPU wake-ups in these VMs otherwise swing the rate 2-12k/s (reference/perf-baseline.md).
"""

from __future__ import annotations

import logging
import socket
import sys
import time

_log = logging.getLogger(__name__)


def serve(addr: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as ls:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((addr, port))
        ls.listen(1)
        conn, _ = ls.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            recv, send = conn.recv, conn.send
            while recv(1):
                send(b"r")


def client(addr: str, port: int, seconds: float) -> float:
    deadline = time.monotonic() + 5.0
    while True:
        try:
            conn = socket.create_connection((addr, port), timeout=2.0)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with conn:
        conn.settimeout(5.0)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        recv, send, now = conn.recv, conn.send, time.monotonic
        warm = now() + 0.2
        while now() < warm:
            send(b"q")
            recv(1)
        count = 0
        start = now()
        end = start + seconds
        while True:
            for _ in range(100):  # check the clock every 100 transactions
                send(b"q")
                recv(1)
            count += 100
            t = now()
            if t >= end:
                return count / (t - start)


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "server":
        serve(argv[1], int(argv[2]))
        return 0
    if len(argv) >= 4 and argv[0] == "client":
        print(f"{client(argv[1], int(argv[2]), float(argv[3])):.1f}", flush=True)
        return 0
    print("usage: python -m tools.bench.rr server ADDR PORT | client ADDR PORT SECONDS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
