"""``python -m kubeemu.bench``: the emulator's performance figures (issue 8's targets).

Measures, on this machine, in one run:

- start time of four emulated clusters started together as processes (``python -m kubeemu``),
  from the first spawn until all four answer ``/readyz`` (target: under 3 s);
- idle RSS of each of those processes after start (target: under 60 MB each);
- 1,000 pod creates against one of them over HTTP with a pool of concurrent clients
  (target: under 3 s), plus the same 1,000 as one sequential client for reference.

Figures are printed, never asserted: the machine is shared and numbers vary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

import aiohttp

from kubeemu.lab import ClusterHandle, start_cluster, stats

_log = logging.getLogger(__name__)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _create_pods(url: str, n: int, concurrency: int, prefix: str) -> float:
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": ""},
            "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}}
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)
        failures = 0

        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                i = queue.get_nowait()
                body["metadata"] = {"name": f"{prefix}-{i}"}
                async with s.post(f"{url}/api/v1/namespaces/default/pods", data=json.dumps(body),
                                  headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    if r.status != 201:
                        failures += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        took = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{failures} of {n} pod creates failed")
    return took


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubeemu.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--clusters", type=int, default=4)
    p.add_argument("--pods", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args(argv)
    handles: list[ClusterHandle] = []
    try:
        t0 = time.perf_counter()
        names = ["east", "west", "north", "south"] + [f"c{i}" for i in range(4, args.clusters)]
        # spawn all, then wait: start_cluster blocks per process, so spawn through threads
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.clusters) as ex:
            futs = [ex.submit(start_cluster, names[i], [f"10.{10 + i}.0.0/16"], [f"10.{96 + i}.0.0/20"])
                    for i in range(args.clusters)]
            handles = [f.result() for f in futs]
        start = time.perf_counter() - t0
        time.sleep(1.0)
        rss = {h.name: rss_mb(h.pid) for h in handles}
        url = handles[0].url
        conc = asyncio.run(_create_pods(url, args.pods, args.concurrency, "bench"))
        seq = asyncio.run(_create_pods(url, args.pods, 1, "seq"))
        rss_after = rss_mb(handles[0].pid)
        stored = stats(url)["objects"]
        assert isinstance(stored, dict)
        if stored.get("pods") != 2 * args.pods:
            raise RuntimeError(f"expected {2 * args.pods} pods stored, the server reports {stored.get('pods')}")
        print(f"kubeemu bench ({sys.version.split()[0]}, {args.clusters} clusters)")
        print(f"  start {args.clusters} servers together:  {start:6.2f} s   (target < 3 s)")
        for name, mb in rss.items():
            print(f"  idle RSS {name:<8}               {mb:6.1f} MB  (target < 60 MB)")
        print(f"  {args.pods} pod creates, {args.concurrency} clients:  {conc:6.2f} s   (target < 3 s)"
              f"  = {args.pods / conc:,.0f}/s")
        print(f"  {args.pods} pod creates, 1 client:    {seq:6.2f} s   = {args.pods / seq:,.0f}/s")
        print(f"  RSS of {handles[0].name} holding {stored['pods']} pods (counted by the server): {rss_after:6.1f} MB")
    finally:
        for h in handles:
            h.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
