"""``fabric-tool check``: probe every pod of a lab from every other pod and show the matrix.

Every ordered pair of distinct pods is probed (same node, same cluster and across clusters,
both directions): the fabric must make each of them work. One worker per *source* pod
(:mod:`tools.diagnose.probe`) runs inside that pod's network namespace and probes all destinations at
once, and all workers run in parallel, so the whole matrix costs about one probe timeout (plus
the workers' start-up), not pairs x timeout.

The pod list comes from the lab's state file only, so ``check`` also works on a lab built without
its fabric processes (that is how the privileged tests check the lab's own plumbing).

Two optional extensions (gateway issue): ``--services`` adds, for every pod, the lab service IP
of every *other* cluster as a destination, and
``--host-network`` adds every node's host network namespace as a source probing every pod of
the other clusters (host-network traffic leaves with an overlay source address that the remote
side must route back). The matrix then has the extra sources as rows and the services as
columns.

The lab service: in a lab without Kubernetes, one fixed IP per cluster that the lab's
kube-proxy stand-in DNATs to a static pod for every protocol (tools/lab/plumbing.py), probed
with ICMP echo. In a ``kubernetes: true`` lab, a real Service of the cluster's API (selector-less,
its EndpointSlice lists the static pods; tools/lab/kube.py) programmed by the lab kube-proxy
(kubeemu.proxy) as a real cluster's would be: it answers only TCP on its port, so it is probed
with a TCP connection (:func:`tools.diagnose.probe.probe_tcp`). The backends listen on nothing:
their kernel's reset, coming back through the Service's DNAT, proves the path; a REJECT
(no endpoints: ICMP port unreachable) or silence fails.

Dual stack (issue 5): every family is probed on its own (``--family 4|6|all``, default all):
a pod with an IPv4 and an IPv6 address is two sources, each probing only destinations of its
family, and the matrix is drawn once per family. A pair whose ends do not both have an address
of a family (an IPv4-only pod and an IPv6-only pod, say) is *not expected* in that family:
listed as such (``not_expected`` in --json, a ``-`` in the matrix, a summary line per cluster
pair), never a failure and never silently missing.

Global IP (issue 4): a pod or service of a cluster with ``globalCIDRs`` is probed from *other*
clusters by its global IP (the only address they can reach it by) and from its own cluster by
its real IP; each pair's result names the address used (``dst_ip``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools import lab, nsutil

_log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parent.parent
#: Extra time a worker gets beyond the probe timeout: interpreter and scapy start-up.
_WORKER_SLACK_S = 20.0


@dataclasses.dataclass(frozen=True)
class Pod:
    label: str  # cluster/node/pN
    netns: str
    ip: str
    #: How other clusters reach it (its cluster maps it in globalCIDRs), else None.
    global_ip: str | None = None
    #: The address family probed (4 or 6): the family of ``ip``.
    family: int = 4
    #: A TCP port to probe instead of ICMP echo (0: ICMP): the lab Service of a
    #: ``kubernetes: true`` lab (see the module docstring).
    port: int = 0

    @property
    def cluster(self) -> str:
        return self.label.split("/", 1)[0]


@dataclasses.dataclass
class PairResult:
    src: str
    dst: str
    dst_ip: str
    proto: str
    ok: bool
    rtt_ms: float | None
    error: str | None
    family: int = 4


@dataclasses.dataclass(frozen=True)
class NotExpected:
    """A pair that cannot work in ``family``: one end has no address of that family."""

    src: str
    dst: str
    family: int
    reason: str


@dataclasses.dataclass
class CheckResult:
    pods: list[Pod]
    pairs: list[PairResult]
    elapsed_s: float = 0.0
    #: Extra matrix columns (services) and rows (host networks); see the module docstring.
    services: list[Pod] = dataclasses.field(default_factory=list)
    hosts: list[Pod] = dataclasses.field(default_factory=list)
    #: Pairs of a probed family that cannot work (see the module docstring).
    not_expected: list[NotExpected] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(1 for p in self.pairs if p.ok)

    @property
    def failed(self) -> int:
        return len(self.pairs) - self.passed

    @property
    def ok(self) -> bool:
        return bool(self.pairs) and self.failed == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "pairs": [dataclasses.asdict(p) for p in self.pairs],
            "passed": self.passed,
            "failed": self.failed,
            "elapsed_s": round(self.elapsed_s, 3),
            "not_expected": [dataclasses.asdict(n) for n in self.not_expected],
        }


FAMILIES = (4, 6)


def pods_of(state: lab.LabState, families: Sequence[int] = FAMILIES) -> list[Pod]:
    """Every pod once per family it has an address of (``families`` in order)."""
    return [
        Pod(f"{n.key}/{p.name}", p.netns, ip, c.global_ip(ip), f)
        for f in families
        for c in state.clusters
        for n in c.nodes
        for p in n.pods
        if (ip := (p.ip if f == 4 else p.ip6))
    ]


def services_of(state: lab.LabState, families: Sequence[int] = FAMILIES) -> list[Pod]:
    """The lab service of every cluster that has one, as a destination ``CLUSTER/svc``, per family
    (probed on its TCP port when it is a real Service of a ``kubernetes: true`` lab)."""
    return [
        Pod(f"{c.name}/svc", "", ip, c.global_ip(ip), f, c.service_port or 0)
        for f in families
        for c in state.clusters
        if (ip := (c.service_ip if f == 4 else c.service_ip6))
    ]


def hosts_of(state: lab.LabState, families: Sequence[int] = FAMILIES) -> list[Pod]:
    """Every node's host network as a source (label ``CLUSTER/NODE``), per family of its cluster
    (the node's IPv4 underlay is the lab's management network: a node of an IPv6-only cluster
    is an IPv6 source only)."""
    out = []
    for f in families:
        for c in state.clusters:
            if f not in c.ip_families:
                continue
            for n in c.nodes:
                ip = n.underlay_ip if f == 4 else n.underlay_ip6
                if ip:
                    out.append(Pod(n.key, n.netns, ip, None, f))
    return out


def not_expected(state: lab.LabState, families: Sequence[int] = FAMILIES, services: bool = False) -> list[NotExpected]:
    """Pod pairs (and pod -> service of another cluster with ``services``) that cannot work in
    each family of ``families`` because an end has no address of it, with the reason."""
    pods = [(c, f"{n.key}/{p.name}", p.ip, p.ip6) for c in state.clusters for n in c.nodes for p in n.pods]
    dsts = list(pods)
    if services:
        dsts += [(c, f"{c.name}/svc", c.service_ip or "", c.service_ip6 or "") for c in state.clusters
                 if c.service_ip or c.service_ip6]  # fmt: skip
    out = []
    for f in families:
        name = "IPv4" if f == 4 else "IPv6"
        for sc, src, s4, s6 in pods:
            for dc, dst, d4, d6 in dsts:
                if src == dst or (dst.endswith("/svc") and dc is sc):
                    continue
                has_src, has_dst = bool(s4 if f == 4 else s6), bool(d4 if f == 4 else d6)
                if has_src == has_dst:
                    continue  # both have it (probed), or neither (no pair of this family at all)
                shared = {fam for fam, ip in ((4, s4), (6, s6)) if ip} & {fam for fam, ip in ((4, d4), (6, d6)) if ip}
                if not shared:
                    reason = f"{sc.name} and {dc.name} share no address family"
                else:
                    reason = f"{dc.name if has_src else sc.name} does not run {name}"
                out.append(NotExpected(src, dst, f, reason))
    return out


def jobs(pods: Sequence[Pod], services: Sequence[Pod] = (), hosts: Sequence[Pod] = ()) -> list[tuple[Pod, list[Pod]]]:
    """Sources with their destinations: pods probe every other pod and the services of the other
    clusters; host networks probe the pods of the other clusters. A destination of another
    cluster with a global IP is given with that IP (see the module docstring)."""
    out: list[tuple[Pod, list[Pod]]] = []
    for src in pods:
        dsts = [d for d in pods if d is not src and d.family == src.family]
        dsts += [s for s in services if s.cluster != src.cluster and s.family == src.family]
        if dsts:
            out.append((src, [_as_seen_from(src, d) for d in dsts]))
    for src in hosts:
        dsts = [d for d in pods if d.cluster != src.cluster and d.family == src.family]
        if dsts:
            out.append((src, [_as_seen_from(src, d) for d in dsts]))
    return out


def _as_seen_from(src: Pod, dst: Pod) -> Pod:
    """``dst`` with the address ``src`` must use: its global IP from another cluster."""
    if dst.global_ip and dst.cluster != src.cluster:
        return dataclasses.replace(dst, ip=dst.global_ip)
    return dst


def parse_worker_output(src: Pod, dsts: Sequence[Pod], stdout: str, stderr: str, rc: int | None) -> list[PairResult]:
    """Turn one worker's output into pair results; a broken worker fails each of its pairs
    with the reason (never silently drops them)."""
    reason: str | None = None
    results: list[Any] = []
    if rc is None:
        reason = "probe worker timed out"
    else:
        try:
            doc = json.loads(stdout)
            if not isinstance(doc, dict):
                raise ValueError("output is not a JSON object")
            if "error" in doc:
                raise ValueError(str(doc["error"]))
            results = doc["results"]
            if not isinstance(results, list) or len(results) != len(dsts):
                raise ValueError(f"expected {len(dsts)} results, got {results!r:.80}")
        except (ValueError, KeyError) as e:
            tail = " | ".join(stderr.strip().splitlines()[-3:])
            reason = f"probe worker failed (exit {rc}): {e}" + (f"; stderr: {tail}" if tail else "")
    out = []
    for i, dst in enumerate(dsts):
        if reason is not None:
            out.append(PairResult(src.label, dst.label, dst.ip, "icmp", False, None, reason, src.family))
            continue
        r = results[i]
        if not isinstance(r, dict) or r.get("dst_ip") != dst.ip:
            out.append(PairResult(src.label, dst.label, dst.ip, "icmp", False, None, f"malformed result {r!r:.80}",
                                  src.family))  # fmt: skip
            continue
        ok = r.get("ok") is True
        rtt = r.get("rtt_ms")
        out.append(
            PairResult(
                src=src.label,
                dst=dst.label,
                dst_ip=dst.ip,
                proto=str(r.get("proto", "icmp")),
                ok=ok,
                rtt_ms=float(rtt) if isinstance(rtt, int | float) else None,
                error=None if ok else str(r.get("error") or "failed"),
                family=src.family,
            )
        )
    return out


def run(
    pods: Sequence[Pod],
    timeout_s: float = 2.0,
    count: int = 1,
    *,
    services: Sequence[Pod] = (),
    hosts: Sequence[Pod] = (),
    only: set[tuple[str, str]] | None = None,
) -> CheckResult:
    """Probe every pair of :func:`jobs` in parallel, one worker per source (only the
    ``(src label, dst label)`` pairs in ``only`` when given: ``--retest-failed``)."""
    t0 = time.monotonic()
    workers: list[tuple[Pod, list[Pod], subprocess.Popen[bytes] | None, str]] = []
    for src, dsts in restrict(jobs(pods, services, hosts), only):
        req: dict[str, Any] = {"targets": [d.ip for d in dsts], "timeout": timeout_s, "count": count}
        if any(d.port for d in dsts):
            req["ports"] = [d.port for d in dsts]
        request = json.dumps(req)
        try:
            proc = nsutil.spawn_in_netns(
                src.netns,
                [sys.executable, "-m", "tools.diagnose.probe"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                new_session=False,
                cwd=str(_REPO),
            )
        except OSError as e:
            workers.append((src, dsts, None, f"cannot start probe worker in {src.netns}: {e.strerror or e}"))
            continue
        # Hand every worker its request now (a few hundred bytes: fits the pipe buffer) so all of
        # them probe at once; their outputs are collected afterwards.
        assert proc.stdin is not None
        try:
            proc.stdin.write(request.encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        proc.stdin = None
        workers.append((src, dsts, proc, ""))
    pairs: list[PairResult] = []
    deadline = time.monotonic() + timeout_s + _WORKER_SLACK_S
    for src, dsts, worker, why in workers:
        if worker is None:
            pairs += [PairResult(src.label, d.label, d.ip, "icmp", False, None, why, src.family) for d in dsts]
            continue
        try:
            out, err = worker.communicate(timeout=max(0.1, deadline - time.monotonic()))
            rc: int | None = worker.returncode
        except subprocess.TimeoutExpired:
            worker.kill()
            out, err = worker.communicate()
            rc = None
        pairs += parse_worker_output(src, dsts, out.decode(errors="replace"), err.decode(errors="replace"), rc)
    return CheckResult(list(pods), pairs, time.monotonic() - t0, list(services), list(hosts))


# -- rendering -------------------------------------------------------------------------------


def _marks() -> tuple[str, str, str]:
    enc = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "✓✗·".encode(enc)
    except (UnicodeEncodeError, LookupError):
        return "+", "X", "."
    return "✓", "✗", "·"


def restrict(todo: list[tuple[Pod, list[Pod]]], only: set[tuple[str, str]] | None) -> list[tuple[Pod, list[Pod]]]:
    """``todo`` narrowed to the pairs in ``only`` (None: all of them); sources left without a
    destination are dropped."""
    if only is None:
        return todo
    out = []
    for src, dsts in todo:
        keep = [d for d in dsts if (src.label, d.label) in only]
        if keep:
            out.append((src, keep))
    return out


# -- last results (--retest-failed) and JUnit (--junit) ------------------------------------------

LAST_RESULTS = "last-check.json"


def save_results(path: Path, result: CheckResult, previous: Sequence[PairResult] = ()) -> None:
    """Remember every pair's outcome: this run's, plus the earlier outcome of pairs this run did
    not probe (a retest of the failures keeps the passes it did not repeat)."""
    probed = {(p.src, p.dst) for p in result.pairs}
    pairs = [p for p in previous if (p.src, p.dst) not in probed] + list(result.pairs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pairs": [dataclasses.asdict(p) for p in pairs]}, indent=1))
    tmp.replace(path)


def load_results(path: Path) -> list[PairResult]:
    """Pairs of the last run; raises ValueError naming the file when it is unreadable."""
    try:
        doc = json.loads(path.read_text())
        return [PairResult(**p) for p in doc["pairs"]]
    except FileNotFoundError:
        raise ValueError(f"no earlier check results in {path}: run 'fabric-tool check' first") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: malformed check results ({type(e).__name__}: {e})") from e


def junit_xml(result: CheckResult, name: str = "fabric-check") -> str:
    """The pairs as a JUnit XML report: one test case per pair, grouped by source."""
    from xml.etree import ElementTree as ET

    suite = ET.Element(
        "testsuite", name=name, tests=str(len(result.pairs)), failures=str(result.failed), errors="0",
        time=f"{result.elapsed_s:.3f}",
    )  # fmt: skip
    for p in result.pairs:
        case = ET.SubElement(suite, "testcase", classname=f"{name}.{p.src}", name=f"{p.dst} ({p.dst_ip}, {p.proto})",
                             time=f"{(p.rtt_ms or 0) / 1000:.6f}")  # fmt: skip
        if not p.ok:
            ET.SubElement(case, "failure", message=p.error or "failed").text = p.error or "failed"
    root = ET.Element("testsuites", name=name)
    root.append(suite)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def render_matrix(result: CheckResult, marks: tuple[str, str, str] | None = None) -> str:
    """Rows are sources, columns destinations (numbered like the rows); a summary closes it.
    With more than one family probed, one matrix per family (see the module docstring)."""
    families = sorted({p.family for p in [*result.pods, *result.hosts, *result.services]}) or [4]
    if len(families) == 1 and not result.not_expected:
        return _render_family(result, marks, families[0], titled=False)
    parts = [_render_family(result, marks, f, titled=True) for f in families]
    lines = ["\n\n".join(parts)]
    if result.not_expected:
        lines.append("")
        lines.append(f"{len(result.not_expected)} pairs not expected (no address of the family at one end):")
        groups: dict[tuple[str, str, int, str], int] = {}
        for n in result.not_expected:
            k = (n.src.split("/", 1)[0], n.dst.split("/", 1)[0], n.family, n.reason)
            groups[k] = groups.get(k, 0) + 1
        for (a, b, f, why), count in sorted(groups.items()):
            lines.append(f"  IPv{f} {a} -> {b}: {count} pairs, {why}")
    protos = sorted({p.proto for p in result.pairs}) or ["icmp"]
    verdict = "all pairs passed" if result.ok else f"{result.failed} FAILED"
    lines.append("")
    lines.append(
        f"{result.passed}/{len(result.pairs)} pairs passed ({', '.join(protos)}), {verdict}, "
        f"{len(result.not_expected)} not expected, {len({p.label for p in result.pods})} pods, "
        f"{result.elapsed_s:.1f} s"
    )
    return "\n".join(lines)


def _render_family(result: CheckResult, marks: tuple[str, str, str] | None, family: int, titled: bool) -> str:
    """The matrix of one family: every pod is a row and a column; a pair of this family that is
    not expected shows ``-``."""
    yes, no, self_mark = marks or _marks()
    fam_pods = [q for q in result.pods if q.family == family]
    if titled:
        # Pods without an address of this family appear too (ip "-"), so nothing goes missing.
        by_label: dict[str, Pod] = {}
        for pod in result.pods:
            if pod.family == family or pod.label not in by_label:
                by_label[pod.label] = pod if pod.family == family else dataclasses.replace(pod, ip="-", family=family)
        fam_pods = list(by_label.values())
    rows = [*fam_pods, *(h for h in result.hosts if h.family == family)]
    cols = [*fam_pods, *(s for s in result.services if s.family == family)]
    pods = rows
    fam_pairs = [p for p in result.pairs if p.family == family]
    protos = sorted({p.proto for p in fam_pairs}) or ["icmp"]
    not_exp = {(n.src, n.dst) for n in result.not_expected if n.family == family}
    cells: dict[tuple[str, str], bool] = {}
    for p in fam_pairs:
        key = (p.src, p.dst)
        cells[key] = cells.get(key, True) and p.ok
    num_w = len(str(len(pods)))
    label_w = max((len(p.label) for p in pods), default=3)
    ip_w = max((len(p.ip) for p in pods), default=2)
    col_w = max(num_w, 1) + 1
    lines = []
    prefix = " " * (num_w + 1) + "src".ljust(label_w) + "  " + "".ljust(ip_w) + " "
    lines.append(prefix + "".join(str(i + 1).rjust(col_w) for i in range(len(cols))) + "   dst")
    prev_cluster = None
    for i, src in enumerate(pods):
        if prev_cluster is not None and src.cluster != prev_cluster:
            lines.append("")
        prev_cluster = src.cluster
        row = []
        for dst in cols:
            if dst is src:
                row.append(self_mark)
            elif (src.label, dst.label) in not_exp:
                row.append("-")
            elif (src.label, dst.label) not in cells:
                row.append(" ")
            else:
                row.append(yes if cells[(src.label, dst.label)] else no)
        lines.append(
            f"{str(i + 1).rjust(num_w)} {src.label.ljust(label_w)}  {src.ip.ljust(ip_w)} "
            + "".join(c.rjust(col_w) for c in row)
        )
    if len(cols) > len(result.pods) or result.hosts:
        lines.append("")
        lines.append("columns: " + ", ".join(f"{i + 1}={d.label}" for i, d in enumerate(cols) if i >= len(result.pods)))
    real_ip = {d.label: d.ip for d in cols}
    by_global = sum(1 for p in fam_pairs if p.dst in real_ip and p.dst_ip != real_ip[p.dst])
    if by_global:
        lines.append("")
        lines.append(f"{by_global} pairs reached a pod or service of another cluster by its global IP (--json: dst_ip)")
    failures = [p for p in fam_pairs if not p.ok]
    if failures:
        lines.append("")
        lines.append("failed pairs:")
        for p in failures[:20]:
            lines.append(f"  {p.src} -> {p.dst} ({p.dst_ip}, {p.proto}): {p.error}")
        if len(failures) > 20:
            lines.append(f"  ... and {len(failures) - 20} more (use --json for all)")
    lines.append("")
    if titled:
        passed = sum(1 for p in fam_pairs if p.ok)
        lines.append(f"IPv{family}: {passed}/{len(fam_pairs)} pairs passed ({', '.join(protos)}), "
                     f"{len(not_exp)} not expected")  # fmt: skip
        return f"IPv{family}\n" + "\n".join(lines)
    verdict = "all pairs passed" if result.ok else f"{result.failed} FAILED"
    lines.append(
        f"{result.passed}/{len(result.pairs)} pairs passed ({', '.join(protos)}), {verdict}, "
        f"{len(result.pods)} pods, {result.elapsed_s:.1f} s"
    )
    return "\n".join(lines)
