"""``fabric-tool check``: probe every pod of a lab from every other pod and show the matrix.

Every ordered pair of distinct pods is probed (same node, same cluster and across clusters,
both directions): the fabric must make each of them work. One worker per *source* pod
(:mod:`tools.probe`) runs inside that pod's network namespace and probes all destinations at
once, and all workers run in parallel, so the whole matrix costs about one probe timeout (plus
the workers' start-up), not pairs x timeout.

The pod list comes from the lab's state file only, so ``check`` also works on a lab built without
its fabric processes (that is how the privileged tests check the lab's own plumbing).

Two optional extensions (gateway issue): ``--services`` adds, for every pod, the lab service IP
of every *other* cluster as a destination (the lab plays kube-proxy, see tools/lab.py), and
``--host-network`` adds every node's host network namespace as a source probing every pod of
the other clusters (host-network traffic leaves with an overlay source address that the remote
side must route back). The matrix then has the extra sources as rows and the services as
columns.

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


@dataclasses.dataclass
class CheckResult:
    pods: list[Pod]
    pairs: list[PairResult]
    elapsed_s: float = 0.0
    #: Extra matrix columns (services) and rows (host networks); see the module docstring.
    services: list[Pod] = dataclasses.field(default_factory=list)
    hosts: list[Pod] = dataclasses.field(default_factory=list)

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
        }


def pods_of(state: lab.LabState) -> list[Pod]:
    return [
        Pod(f"{n.key}/{p.name}", p.netns, p.ip, c.global_ip(p.ip)) for c in state.clusters for n in c.nodes
        for p in n.pods
    ]


def services_of(state: lab.LabState) -> list[Pod]:
    """The lab service of every cluster that has one, as a destination ``CLUSTER/svc``."""
    return [Pod(f"{c.name}/svc", "", c.service_ip, c.global_ip(c.service_ip)) for c in state.clusters if c.service_ip]


def hosts_of(state: lab.LabState) -> list[Pod]:
    """Every node's host network as a source (label ``CLUSTER/NODE``)."""
    return [Pod(n.key, n.netns, n.underlay_ip) for n in state.nodes()]


def jobs(pods: Sequence[Pod], services: Sequence[Pod] = (), hosts: Sequence[Pod] = ()) -> list[tuple[Pod, list[Pod]]]:
    """Sources with their destinations: pods probe every other pod and the services of the other
    clusters; host networks probe the pods of the other clusters. A destination of another
    cluster with a global IP is given with that IP (see the module docstring)."""
    out: list[tuple[Pod, list[Pod]]] = []
    for src in pods:
        dsts = [d for d in pods if d is not src] + [s for s in services if s.cluster != src.cluster]
        if dsts:
            out.append((src, [_as_seen_from(src, d) for d in dsts]))
    for src in hosts:
        dsts = [d for d in pods if d.cluster != src.cluster]
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
            out.append(PairResult(src.label, dst.label, dst.ip, "icmp", False, None, reason))
            continue
        r = results[i]
        if not isinstance(r, dict) or r.get("dst_ip") != dst.ip:
            out.append(PairResult(src.label, dst.label, dst.ip, "icmp", False, None, f"malformed result {r!r:.80}"))
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
        request = json.dumps({"targets": [d.ip for d in dsts], "timeout": timeout_s, "count": count})
        try:
            proc = nsutil.spawn_in_netns(
                src.netns,
                [sys.executable, "-m", "tools.probe"],
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
            pairs += [PairResult(src.label, d.label, d.ip, "icmp", False, None, why) for d in dsts]
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
    """Rows are sources, columns destinations (numbered like the rows); a summary closes it."""
    yes, no, self_mark = marks or _marks()
    rows = [*result.pods, *result.hosts]
    cols = [*result.pods, *result.services]
    pods = rows
    protos = sorted({p.proto for p in result.pairs}) or ["icmp"]
    cells: dict[tuple[str, str], bool] = {}
    for p in result.pairs:
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
    by_global = sum(1 for p in result.pairs if p.dst in real_ip and p.dst_ip != real_ip[p.dst])
    if by_global:
        lines.append("")
        lines.append(f"{by_global} pairs reached a pod or service of another cluster by its global IP (--json: dst_ip)")
    failures = [p for p in result.pairs if not p.ok]
    if failures:
        lines.append("")
        lines.append("failed pairs:")
        for p in failures[:20]:
            lines.append(f"  {p.src} -> {p.dst} ({p.dst_ip}, {p.proto}): {p.error}")
        if len(failures) > 20:
            lines.append(f"  ... and {len(failures) - 20} more (use --json for all)")
    lines.append("")
    verdict = "all pairs passed" if result.ok else f"{result.failed} FAILED"
    lines.append(
        f"{result.passed}/{len(result.pairs)} pairs passed ({', '.join(protos)}), {verdict}, "
        f"{len(result.pods)} pods, {result.elapsed_s:.1f} s"
    )
    return "\n".join(lines)
