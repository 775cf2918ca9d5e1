"""``python -m kubeemu.proxy``: the lab kube-proxy of one cluster, for every node of it.

Upstream runs one kube-proxy per node; the lab runs one process per cluster that programs
every node's network namespace (the nodes are namespaces of one machine, and one process
keeps the lab's process count down). Per node the result is what upstream's would be: the
rules depend only on the Services, the EndpointSlices and that node.

The process, in order:

1. shared informers (:mod:`kubeemu.ctrl.base`) list+watch Services, EndpointSlices and Nodes;
   every event marks the state dirty and remembers when the first unsynced change arrived;
2. the sync loop waits for a change, at most one sync per ``--min-sync-period`` (upstream's
   flag; lab default 0.1 s instead of 1 s so a test sees endpoint changes quickly), computes for
   every (node, family) the table text (:func:`kubeemu.proxy.rules.ruleset`, pure) and applies
   only the tables whose text changed since the last apply (:mod:`kubeemu.proxy.apply`: one
   ``nft -f`` transaction per table, all nodes in parallel). It logs the latency from the first
   change to the rules being in place;
3. at start, and every ``--sync-period``, it compares the hash in each kernel table's comment
   with the desired one and re-applies a table someone changed or deleted (a restarted proxy
   therefore re-applies nothing that is already right).

An ``nft`` failure is logged and retried on the next sync (with back-off); it never ends the
process. ``--cleanup`` removes our tables from the given nodes and exits (upstream's flag).
Exiting leaves the rules in place, as upstream does: established and new connections keep
working while the proxy restarts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kubeemu.client import Client
from kubeemu.ctrl.base import Informers
from kubeemu.process import run_until_signalled
from kubeemu.proxy import apply, rules

_log = logging.getLogger(__name__)

FAMILIES = (4, 6)


@dataclass(frozen=True)
class NodeTarget:
    """A node this proxy programs: its Node name and its network namespace."""

    name: str
    netns: str


def parse_node(spec: str) -> NodeTarget:
    """``NODE:NETNS`` (``--node``); raises ValueError naming the bad value."""
    name, sep, netns = spec.partition(":")
    if not sep or not name or not netns or "/" in netns:
        raise ValueError(f"--node {spec!r}: expected NODE:NETNS (a name under {apply.NETNS_DIR})")
    return NodeTarget(name, netns)


class Proxy:
    """Watches one cluster's API and keeps every node's kube-proxy tables in sync."""

    def __init__(self, client: Client, nodes: Sequence[NodeTarget], cluster_cidrs: Sequence[str] = (),
                 service_cidrs: Sequence[str] = (), min_sync_period: float = 0.1, sync_period: float = 30.0,
                 families: Sequence[int] = FAMILIES) -> None:
        self.client = client
        self.nodes = list(nodes)
        self.cluster_cidrs, self.service_cidrs = list(cluster_cidrs), list(service_cidrs)
        self.min_sync_period, self.sync_period = min_sync_period, sync_period
        self.families = list(families)
        self.informers = Informers(client)
        self.services = self.informers.get("v1", "services")
        self.slices = self.informers.get("discovery.k8s.io/v1", "endpointslices")
        self.node_objs = self.informers.get("v1", "nodes")
        self._dirty = asyncio.Event()
        self._first_change: float | None = None
        #: (node, family) -> text applied last (None: unknown, check the kernel).
        self.applied: dict[tuple[str, int], str | None] = {}
        self.syncs = 0
        for inf in (self.services, self.slices, self.node_objs):
            inf.add_handler(self._changed)

    def _changed(self, etype: str, old: object, new: object) -> None:
        if self._first_change is None:
            self._first_change = time.monotonic()
        self._dirty.set()

    def service_ports(self, family: int) -> list[rules.ServicePort]:
        return rules.service_ports(self.services.cache.values(), self.slices.cache.values(), family)

    def desired(self, node: NodeTarget, family: int, ports: list[rules.ServicePort] | None = None) -> str:
        """The table text for ``node`` and ``family`` from the current caches (pure function)."""
        if ports is None:
            ports = self.service_ports(family)
        info = rules.node_info(self.node_objs.get(node.name), node.name)
        return rules.ruleset(ports, info, family, self.cluster_cidrs, self.service_cidrs)

    async def _sync_one(self, node: NodeTarget, family: int, verify: bool, ports: list[rules.ServicePort]) -> bool:
        """Apply one table if needed; True when it was written."""
        text = self.desired(node, family, ports)
        key = (node.name, family)
        if not verify and self.applied.get(key) == text:
            return False
        if (verify or self.applied.get(key) is None) and \
                await apply.kernel_hash(node.netns, family) == rules.table_hash(text):
            self.applied[key] = text
            return False
        await apply.apply_table(node.netns, text, family)
        self.applied[key] = text
        return True

    async def sync(self, verify: bool = False) -> int:
        """One pass over every (node, family); returns how many tables were written. ``verify``
        compares with the kernel instead of the last applied text."""
        started = self._first_change
        self._first_change = None
        self._dirty.clear()
        jobs = [(n, f) for n in self.nodes for f in self.families]
        ports = {f: self.service_ports(f) for f in self.families}  # the same for every node
        results = await asyncio.gather(*(self._sync_one(n, f, verify, ports[f]) for n, f in jobs),
                                       return_exceptions=True)
        written, failed = 0, []
        for (n, f), r in zip(jobs, results, strict=True):
            if isinstance(r, BaseException):
                if not isinstance(r, apply.ApplyError | OSError):
                    raise r
                failed.append(f"{n.name} IPv{f}: {r}")
                self.applied[(n.name, f)] = None
            elif r:
                written += 1
        self.syncs += 1
        if failed:
            raise apply.ApplyError("; ".join(failed))
        if written:
            lag = f", {1000 * (time.monotonic() - started):.1f} ms after the change" if started else ""
            _log.info("synced: %d tables written%s", written, lag)
        return written

    async def run(self) -> None:
        self.informers.start()
        try:
            await self.informers.wait_synced()
            _log.info("caches synced: %d services, %d endpoint slices; programming %s", len(self.services.cache),
                      len(self.slices.cache), ", ".join(f"{n.name} ({n.netns})" for n in self.nodes))
            verify, backoff, first = True, self.min_sync_period, True
            next_verify = time.monotonic() + self.sync_period
            while True:
                try:
                    written = await self.sync(verify)
                    backoff = self.min_sync_period
                    if first:
                        first = False
                        _log.info("initial sync: %d of %d tables written (the others were in the kernel already)",
                                  written, len(self.nodes) * len(self.families))
                except apply.ApplyError as e:
                    _log.error("sync failed (retrying in %.1f s): %s", backoff, e)
                    self._dirty.set()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                await asyncio.sleep(self.min_sync_period)
                try:
                    async with asyncio.timeout(max(0.0, next_verify - time.monotonic())):
                        await self._dirty.wait()
                    verify = False
                except TimeoutError:
                    verify = True
                if verify or time.monotonic() >= next_verify:
                    verify, next_verify = True, time.monotonic() + self.sync_period
        finally:
            await self.informers.stop()


async def cleanup(nodes: Sequence[NodeTarget], families: Sequence[int] = FAMILIES) -> None:
    await asyncio.gather(*(apply.delete_table(n.netns, f) for n in nodes for f in families))


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kubeemu.proxy", description="The lab kube-proxy (nftables) for the nodes of one cluster.",
        epilog="example:\n  python -m kubeemu.proxy --server http://127.0.0.1:6443 --node e1:kf-east-e1 "
               "--node e2:kf-east-e2 --cluster-cidr 10.10.0.0/16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", help="the API server URL (http://HOST:PORT); not needed with --cleanup")
    p.add_argument("--node", action="append", default=[], metavar="NODE:NETNS",
                   help="a node to program: its Node name and network namespace (repeat per node)")
    p.add_argument("--cluster-cidr", default="", help="the cluster's pod CIDRs, comma-separated: traffic to a "
                   "ClusterIP from any other source is masqueraded (upstream's --cluster-cidr)")
    p.add_argument("--service-cidr", default="", help="service CIDRs, comma-separated: traffic to an unallocated "
                   "address of them is dropped")
    p.add_argument("--min-sync-period", type=float, default=0.1, help="seconds between syncs at most (default 0.1)")
    p.add_argument("--sync-period", type=float, default=30.0,
                   help="seconds between checks that the kernel still has our tables (default 30)")
    p.add_argument("--cleanup", action="store_true", help="delete our tables from the nodes and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        nodes = [parse_node(s) for s in args.node]
        cluster_cidrs, service_cidrs = _csv(args.cluster_cidr), _csv(args.service_cidr)
        for c in (*cluster_cidrs, *service_cidrs):
            rules.family_of(c)
    except ValueError as e:
        p.error(str(e))
    if not nodes:
        p.error("no --node given: nothing to program")
    if args.cleanup:
        try:
            asyncio.run(cleanup(nodes))
        except apply.ApplyError as e:
            print(f"kube-proxy --cleanup: {e}", file=sys.stderr)
            return 1
        return 0
    if not args.server:
        p.error("--server is required (unless --cleanup)")

    async def serve() -> None:
        async with Client(args.server, user_agent="kubeemu-proxy") as client:
            proxy = Proxy(client, nodes, cluster_cidrs, service_cidrs, args.min_sync_period, args.sync_period)
            await run_until_signalled(proxy.run(), "kube-proxy stopping (rules stay in place)")

    print(f"kube-proxy for {args.server}: nodes {', '.join(f'{n.name}:{n.netns}' for n in nodes)}", flush=True)
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
