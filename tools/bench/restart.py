"""Restart benchmark: packets a 10 ms ping across clusters loses while the source node's agent restarts.

The contract (DESIGN.md): restarting an agent loses no packets, because the agent never deletes
anything before its first complete snapshot and the kernel keeps forwarding while no agent runs.

On a fresh lab (two P2P clusters, one node and one pod each; torn down afterwards), each round:

1. **ours** — ``ping -i 0.01 -c COUNT`` from ``east/e1/p0`` to ``west/w1/p0``; one second in,
   the agent of ``east/e1`` is stopped (``tools.lab.stop_agent``, as ``fabric-tool lab
   stop-agent``) and started again, waiting until the lab is back in sync (``start_agent_cmd``).
   ``-c`` (not a signal) ends ping, so no packet still in flight is miscounted as lost.
2. **baseline** — the same ping over the same path with nothing restarting (the noise floor,
   expected 0).

Figures: ``packets_lost`` (ours vs baseline; ``ratio`` = our delivered fraction / the
baseline's, 1.0 = nothing lost to the restart) and ``restart_s``, how long the stop, start and
resync took (no baseline: it says how much of the ping window the restart covered).
"""

from __future__ import annotations

import logging
import statistics
import subprocess
import time

from tools import lab
from tools.bench import common as bc

_log = logging.getLogger(__name__)
NAME = "restart"
HELP = "packets lost by a 10 ms ping across clusters while the source node's agent restarts (baseline: 0)"
INTERVAL_S = 0.01


def requires(opts: bc.Options) -> list[str]:
    return bc.need_root("the restart benchmark") + bc.need_programs("ip", "ping")


def _ping(procs: bc.Procs, pods: bc.LabPods, count: int) -> subprocess.Popen[bytes]:
    return procs.spawn(
        pods.src_ns,
        ["ping", "-n", "-q", "-i", f"{INTERVAL_S:g}", "-W", "1", "-c", str(count), pods.dst_ip],
        stdout=subprocess.PIPE,
    )


def _finish(procs: bc.Procs, proc: subprocess.Popen[bytes], count: int) -> tuple[int, int]:
    try:
        out, _ = proc.communicate(timeout=count * INTERVAL_S + 30)
    finally:
        procs.stop(proc)
    return bc.ping_counts(out.decode(errors="replace"))


def run(opts: bc.Options) -> bc.Report:
    window_s = 4.0 if opts.tiny else 10.0
    count = round(window_s / INTERVAL_S)
    lost: dict[str, list[float]] = {"ours": [], "base": []}
    delivered: dict[str, list[float]] = {"ours": [], "base": []}
    restart_s: list[float] = []
    notes: list[str] = []
    with bc.procs() as procs, bc.p2p_lab(NAME) as pods:
        quiet = lambda m: bc.progress(NAME, m)  # noqa: E731
        for rnd in range(opts.repeat):
            bc.progress(NAME, f"round {rnd + 1}/{opts.repeat}: {count} pings at {INTERVAL_S * 1000:g} ms, agent of "
                        f"{pods.src_node} restarted 1 s in")  # fmt: skip
            ping = _ping(procs, pods, count)
            time.sleep(1.0)
            t0 = time.monotonic()
            lab.stop_agent(pods.name, pods.src_node, progress=quiet)
            lab.start_agent_cmd(pods.name, pods.src_node, wait=True, timeout_s=60.0, progress=quiet)
            took = time.monotonic() - t0
            restart_s.append(took)
            if took + 1.0 > window_s:
                notes.append(f"round {rnd + 1}: the restart took {took:.1f}s, longer than the ping window; "
                             "losses after the window are not counted")  # fmt: skip
            tx, rx = _finish(procs, ping, count)
            lost["ours"].append(tx - rx)
            delivered["ours"].append(rx / tx if tx else float("nan"))
            bc.progress(NAME, f"round {rnd + 1}: restart took {took:.2f}s; {tx - rx} of {tx} pings lost; baseline next")
            tx, rx = _finish(procs, _ping(procs, pods, count), count)
            lost["base"].append(tx - rx)
            delivered["base"].append(rx / tx if tx else float("nan"))
    report = bc.Report(units={"packets_lost": "packets", "restart_s": "s"}, notes=notes)
    fig = bc.spread(lost["ours"])
    fig.update(bc.spread(lost["base"], "baseline_"))
    fig["ratio"] = bc.ratio(statistics.median(delivered["ours"]), statistics.median(delivered["base"]), True)
    report.figures["packets_lost"] = fig
    report.figures["restart_s"] = bc.spread(restart_s)
    report.notes.append(
        f"{count} pings per round ({window_s:g} s at {INTERVAL_S * 1000:g} ms); baseline = the same ping with no "
        "restart; ratio = delivered fraction ours / baseline (1.0 = the restart lost nothing)."
    )
    return report
