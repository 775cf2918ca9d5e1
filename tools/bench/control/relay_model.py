"""A scaling model of the control plane with and without relays, fitted to ``bench control
--relays`` JSON files: ``python -m tools.bench.control.relay_model RUN.json ... [--at 50000,100000]``.

The model (per configuration: direct, or behind K relays) is deliberately simple, so that its few
parameters are read off the measurements and nothing is assumed:

* reflector CPU per agent during bring-up ``c(N) = a + b*N`` (ms; ``b`` > 0 when something in
  the reflector grows with N per agent, e.g. planning over more clusters): least squares over
  the Ns measured, constant when only one N was. A line that falls with N (start-up work spread
  over more agents) is not followed below the least value measured: it would reach zero and go
  negative past the Ns measured, and nothing says a per-agent cost keeps falling;
* reflector RSS per agent ``r(N) = a + b*N`` (KiB), fitted the same way;
* the relays' CPU per agent during bring-up (ms, all relays together), fitted the same way;
* bring-up time: the reflector is one Python process, so a bring-up can never take less than its
  CPU time ``c(N)*N``; the measured bring-up divided by that CPU time is the *stall factor*
  ``s`` (time the loop waited on other processes sharing the cores, plus idle turns), taken at
  the largest N measured. Predicted bring-up = ``s * c(N) * N`` (a lower bound when the relays
  and agents run on other machines, which removes most of the sharing ``s`` contains).

Relays needed: enough that each holds no more agents than the largest per-relay load measured
(N/K of the best measured K at the largest N): the relay's per-agent work is constant in N
(its agents' streams), so that load is known to work; more per relay is not measured.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_KEY = re.compile(r"^relays(?P<k>\d+)_(?P<what>.+)_gateway_n(?P<n>\d+)$")


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``y = a + b*x``; a constant when there is one distinct x."""
    xs = {x for x, _ in points}
    if len(xs) < 2:
        return sum(y for _, y in points) / len(points), 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - b * mx, b


def _at(fit: tuple[float, float], n: int, measured: Sequence[float]) -> float:
    """``fit`` at ``n``, never below the least of the values it was fitted to (module docstring)."""
    return max(fit[0] + fit[1] * n, min(measured))


def collect(runs: Sequence[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """config ("direct" or "K relays") -> N -> measure -> value (medians)."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for run in runs:
        for key, fig in run.get("control", {}).items():
            m = _KEY.match(key)
            if not m or not isinstance(fig, dict):
                continue
            k, what, n = int(m["k"]), m["what"], int(m["n"])
            via = out.setdefault(f"{k} relays", {}).setdefault(n, {})
            direct = out.setdefault("direct", {}).setdefault(n, {})
            via[what] = float(fig["median"])
            via["k"] = k
            if not what.startswith("relays_"):
                direct[what] = float(fig["baseline_median"])
    return out


def model(data: dict[str, dict[int, dict[str, float]]], at: Sequence[int]) -> list[str]:
    lines = []
    for config, by_n in sorted(data.items()):
        ns = sorted(by_n)
        cpus = [by_n[n]["reflector_bringup_cpu_per_agent"] for n in ns]
        rsss = [by_n[n]["reflector_rss_per_agent"] for n in ns]
        cpu, rss = _fit(list(zip(ns, cpus, strict=True))), _fit(list(zip(ns, rsss, strict=True)))
        top = by_n[ns[-1]]
        stall = top["bringup"] / max(1e-9, top["reflector_bringup_cpu_per_agent"] * ns[-1] / 1000)
        line = (f"{config}: measured N={','.join(map(str, ns))}; reflector CPU/agent {cpu[0]:.3f} + "
                f"{cpu[1] * 1e3:.4f}e-3*N ms, RSS/agent {rss[0]:.1f} + {rss[1] * 1e3:.4f}e-3*N KiB, "
                f"stall factor {stall:.2f} (at N={ns[-1]})")  # fmt: skip
        relay_cpu = None
        relay_cpus: list[float] = []
        if "relays_bringup_cpu_per_agent" in top:
            relay_cpus = [by_n[n]["relays_bringup_cpu_per_agent"] for n in ns]
            relay_cpu = _fit(list(zip(ns, relay_cpus, strict=True)))
            line += f"; relays' CPU/agent {relay_cpu[0]:.3f} + {relay_cpu[1] * 1e3:.4f}e-3*N ms"
        lines.append(line)
        for n in at:
            c = _at(cpu, n, cpus)
            r = _at(rss, n, rsss)
            pred = (f"  N={n:,}: reflector bring-up CPU {c * n / 1000:,.0f} s, bring-up ~{stall * c * n / 1000:,.0f} s "
                    f"(>= {c * n / 1000:,.0f} s), reflector RSS {r * n / 1024:,.0f} MiB")  # fmt: skip
            if relay_cpu is not None:
                per_relay = ns[-1] / top["k"]
                k = -(-n // int(per_relay))
                pred += (f", {k} relays of <= {per_relay:,.0f} agents each, "
                         f"{_at(relay_cpu, n, relay_cpus) * n / 1000 / k:,.0f} s CPU each")  # fmt: skip
            lines.append(pred)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.control.relay_model", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="JSON of fabric-tool bench control --relays runs")
    p.add_argument("--at", default="50000,100000", help="Ns to predict (default 50000,100000)")
    args = p.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.runs]
    data = collect(runs)
    if not data:
        p.error("no relays*_..._gateway_nN figures in the runs (fabric-tool bench control --relays K --shape gateway)")
    for line in model(data, [int(x) for x in args.at.split(",")]):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
