"""``fabric-tool bench``: the benchmark suite's entry point and registry.

Every benchmark is a module ``tools/bench/<name>.py`` with ``NAME``, ``HELP``,
``requires(options) -> [reasons it cannot run here]`` and ``run(options) -> Report`` (see
:mod:`tools.bench.common`). :data:`BENCHMARKS` lists them in running order (every benchmark of
issue 7: datapath, restart, netlink, gateway, failover, translate, control; issue 15: k8s;
issue 16: scheduler; issue 17: tree; issue 20: control-tls; issue 19: leafview, frag, placement;
issue 18: mcs); ``supported`` says whether this build can run one at all (a benchmark whose
feature is missing is skipped when no names are given, refused when named).

Output: a table per benchmark on stdout (progress on stderr); ``--json FILE`` writes
``{bench: {metric: {median, min, max, baseline_median, ..., ratio, unit}}, "meta": {...}}``;
``--markdown FILE`` writes BENCHMARKS.md (machine, date, command, every table and note), and
``--from-json FILE --markdown OUT`` re-renders it from an earlier JSON without running anything.
Ratios are oriented so higher is better (throughput: ours / baseline; latency: baseline / ours).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import logging
import math
import os
import platform
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from fabric.cli_types import positive_float
from tools.bench import common as bc

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    module: str
    #: False when the capability it measures is not in this build yet.
    supported: Callable[[], bool] = lambda: True

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)  # late: heavy imports, root only when run


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("datapath", "tools.bench.datapath"),
        Benchmark("restart", "tools.bench.restart"),
        Benchmark("netlink", "tools.bench.netlink"),
        Benchmark("gateway", "tools.bench.gateway"),
        Benchmark("failover", "tools.bench.failover"),
        Benchmark("translate", "tools.bench.translate"),
        Benchmark("control", "tools.bench.control"),
        Benchmark("control-tls", "tools.bench.control.tls_bench"),
        Benchmark("k8s", "tools.bench.k8s", supported=lambda: importlib.import_module("tools.bench.k8s").supported()),
        Benchmark("scheduler", "tools.bench.scheduler",
                  supported=lambda: importlib.import_module("tools.bench.scheduler").supported()),
        Benchmark("tree", "tools.bench.tree",
                  supported=lambda: importlib.import_module("tools.bench.tree").supported()),
        Benchmark("leafview", "tools.bench.leafview"),
        Benchmark("frag", "tools.bench.frag"),
        Benchmark("placement", "tools.bench.placement"),
        Benchmark("mcs", "tools.bench.mcs"),
    )
}


def _parse_n(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--n {text!r}: expected comma-separated integers like 100,1000") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--n {text!r}: every N must be at least 1")
    return values


def _parse_relays(text: str) -> tuple[int, ...]:
    try:
        values = tuple(dict.fromkeys(int(x) for x in text.split(",") if x.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--relays {text!r}: expected comma-separated integers like 2,4") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--relays {text!r}: every K must be at least 1")
    return values


def _parse_shapes(text: str) -> tuple[str, ...]:
    values = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    unknown = [v for v in values if v not in bc.CONTROL_SHAPES]
    if not values or unknown:
        raise argparse.ArgumentTypeError(
            f"--shape {text!r}: expected comma-separated shapes of {', '.join(bc.CONTROL_SHAPES)}"
        )
    return values


# -- machine and rendering -------------------------------------------------------------------


def machine() -> dict[str, str]:
    """CPU model, cores, kernel and memory of this machine, for the record."""
    cpu, memory = "unknown CPU", "unknown"
    with contextlib.suppress(OSError, StopIteration, ValueError, IndexError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    with contextlib.suppress(OSError, StopIteration, ValueError, IndexError):
        lines = Path("/proc/meminfo").read_text().splitlines()
        mem_kib = next(int(line.split()[1]) for line in lines if line.startswith("MemTotal"))
        memory = f"{mem_kib / 1024 / 1024:.1f} GiB"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count() or "?"),
        "kernel": f"{platform.system()} {platform.release()}",
        "memory": memory,
        "python": platform.python_version(),
    }


def _num(x: Any) -> str:
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one benchmark's table: every figure, its baselines and ratios."""
    figures = {k: v for k, v in results.items() if isinstance(v, dict) and k != "samples"}
    prefixes: list[str] = []
    for fig in figures.values():
        for key in fig:
            if key.endswith("baseline_median"):
                pre = key[: -len("baseline_median")]
                if pre not in prefixes:
                    prefixes.append(pre)
    header = ["metric", "unit", "ours median", "min", "max"]
    for pre in prefixes:
        label = pre.rstrip("_") or "baseline"
        header += [f"{label} median", f"{pre}ratio"]
    rows = []
    for metric, fig in figures.items():
        row = [metric, str(fig.get("unit", "")), _num(fig.get("median")), _num(fig.get("min")), _num(fig.get("max"))]
        for pre in prefixes:
            row += [_num(fig.get(f"{pre}baseline_median")), _num(fig.get(f"{pre}ratio"))]
        rows.append(row)
    return header, rows


def render_text(results: dict[str, Any]) -> str:
    header, rows = _rows(results)
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in table]  # fmt: skip
    lines += [f"note: {n}" for n in results.get("notes", [])]
    return "\n".join(lines)


def render_markdown(doc: dict[str, Any]) -> str:
    meta = doc.get("meta", {})
    m = meta.get("machine", {})
    out = [
        "# Benchmarks",
        "",
        f"Generated by `{meta.get('command', 'fabric-tool bench')}` on {meta.get('date', '?')}.",
        "Regenerate with `sudo .venv/bin/fabric-tool bench --repeat 3 --json bench.json --markdown BENCHMARKS.md`",
        "(or re-render an earlier run: `fabric-tool bench --from-json bench.json --markdown BENCHMARKS.md`).",
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('memory', '?')} RAM, "
        f"{m.get('kernel', '?')}, Python {m.get('python', '?')}. Rounds per benchmark: {meta.get('repeat', '?')}.",
        "",
        "Every figure is the median (min, max) over the rounds, next to its baseline measured in the same run on",
        "the same machine; ratios are oriented so that **higher is better** (throughput and rates: ours / baseline;",
        "latency and time: baseline / ours). This machine is a small shared VM (other jobs ran on its cores during",
        "the run), so absolute figures are noisy and move ±30-50 % between runs: compare the same-run ratios,",
        "not absolute numbers across runs.",
        "",
    ]
    for name, results in doc.items():
        if name == "meta" or not isinstance(results, dict):
            continue
        bench = BENCHMARKS.get(name)
        helptext = ""
        if bench is not None:
            try:
                helptext = str(bench.load().HELP)
            except ImportError:
                helptext = ""
        out += [f"## {name}", ""]
        if helptext:
            out += [helptext[0].upper() + helptext[1:] + ".", ""]
        header, rows = _rows(results)
        if rows:
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out += ["| " + " | ".join(r) + " |" for r in rows]
            out.append("")
        for note in results.get("notes", []):
            out.append(f"- {note}")
        out.append("")
    for name, why in meta.get("skipped", {}).items():
        out.append(f"- `{name}` was not run: {why}")
    return "\n".join(out).rstrip() + "\n"


def merge_runs(first: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """One document from two runs (e.g. the kernel benchmarks and ``control`` run separately):
    benchmarks of the later run replace the earlier's; meta records both commands and dates."""
    if not first:
        return later
    out = {**first, **{k: v for k, v in later.items() if k != "meta"}}
    m1, m2 = first.get("meta", {}), later.get("meta", {})
    skipped = {**m1.get("skipped", {}), **m2.get("skipped", {})}
    out["meta"] = {
        **m1,
        "date": " and ".join(dict.fromkeys([m1.get("date", "?"), m2.get("date", "?")])),
        "command": f"{m1.get('command', '?')}` and `{m2.get('command', '?')}",
        "skipped": {k: v for k, v in skipped.items() if k not in out},
    }
    return out


def _to_json(report: bc.Report) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric, fig in report.figures.items():
        entry: dict[str, Any] = {k: (v if math.isfinite(v) else None) for k, v in fig.items()}
        if metric in report.units:
            entry["unit"] = report.units[metric]
        out[metric] = entry
    if report.notes:
        out["notes"] = list(report.notes)
    if report.samples:
        out["samples"] = {m: {k: [v if math.isfinite(v) else None for v in vs] for k, vs in by.items()}
                          for m, by in report.samples.items()}  # fmt: skip
    return out


# -- main ------------------------------------------------------------------------------------


#: The process that runs the benchmarks (set by :func:`main`).
_MAIN_PID = 0


def _sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds through every benchmark's cleanup, like Ctrl-C - in our own process only.

    Our own code never forks a child that keeps running Python (see :mod:`fabric.netns`), but a
    library might, and such a child inherits this handler. Unwinding *its* copy of our stack
    would run our cleanup a second time, from the wrong process (unmounting, deleting
    namespaces of a benchmark still running), so a forked child just exits.
    """
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fabric-tool bench",
        description="Run benchmarks side by side with baselines measured in the same run. "
        "Ratios: higher is better. Progress goes to stderr.",
        epilog="examples:\n  fabric-tool bench netlink --repeat 5 --json /tmp/bench.json\n"
        "  fabric-tool bench control --n 100,1000\n"
        "  fabric-tool bench control-tls --n 1000 --repeat 3   (mutual TLS on vs off, interleaved rounds)\n"
        "  fabric-tool bench k8s --repeat 3   (a 200-replica Deployment in a lab; no lab: python -m kubeemu.bench)\n"
        "  fabric-tool bench scheduler --nodes 1000,5000 --pods 10000   (no lab, no root; --quick: CI smoke)\n"
        "  fabric-tool bench tree --repeat 3 --tree-pods 1000 --json tree.json   (a ClusterTree lab: root + 4 leaves)\n"
        "  fabric-tool bench leafview --nodes 5000 --repeat 3   (the per-node leaf view vs brute force; no root)\n"
        "  fabric-tool bench placement --seeds 3 --json p.json   (placement policies side by side; no root)\n"
        "  fabric-tool bench mcs --repeat 3   (an endpoint change -> every importer, 100 services x 10 clusters)\n"
        "  fabric-tool bench --from-json a.json tree.json --markdown BENCHMARKS.md   (re-render, merged in order)\n"
        "  fabric-tool bench --repeat 3 --json bench.json --markdown BENCHMARKS.md   (the full suite)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME",
        help=f"benchmarks to run (default: all this build supports: {', '.join(BENCHMARKS)})",
    )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3, help="rounds per benchmark (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--markdown", metavar="FILE", help="also write the results as Markdown (BENCHMARKS.md)")
    parser.add_argument("--from-json", metavar="FILE", nargs="+",
                        help="run nothing: render --markdown from earlier --json files (merged in order)")  # fmt: skip
    parser.add_argument("--n", type=_parse_n, default=bc.Options.n, metavar="N,N,...",
                        help="control: numbers of simulated agents (default 100,1000,10000; control-tls 1000)")
    parser.add_argument("--shape", type=_parse_shapes, default=bc.Options.shapes, metavar="SHAPE,...",
                        help="control: p2p (2 P2P clusters: every agent holds every node), gateway "
                        "(gateway-mode clusters of 100 nodes, 3 gateway candidates each, each in its own underlay "
                        "block: a join changes its cluster's gateways), subnets (the same clusters declaring their "
                        "blocks as nodeCIDRs) and/or interleaved (the same clusters, their nodes' addresses "
                        "interleaved: a join changes every node outside its cluster), run at every N (default: "
                        "gateway and subnets for every N, p2p and interleaved for N <= 1000)")  # fmt: skip
    parser.add_argument("--budget", type=positive_float, default=bc.Options.budget_s, metavar="S",
                        help="control: seconds to bring up the agents of one N (default %(default)g)")  # fmt: skip
    parser.add_argument("--relays", type=_parse_relays, default=(), metavar="K,K,...",
                        help="control: also run each N with the agents behind K fabric-relay processes (one phase "
                        "per K) and print bring-up and join fan-out beside the direct run (default: no relay "
                        "phase)")  # fmt: skip
    parser.add_argument("--tiny", "--quick", action="store_true",
                        help="smoke-test sizes: short and small, proves it runs (CI)")
    parser.add_argument("--nodes", type=_parse_n, default=(), metavar="N,N,...",
                        help="scheduler: node counts (default 1000,5000; the spread run uses the smallest); "
                        "leafview: leaf nodes per view (default 5000)")
    parser.add_argument("--pods", type=int, default=0, metavar="N", help="scheduler: pods per run (default 10000)")
    parser.add_argument("--tree-pods", type=int, default=0, metavar="N",
                        help="tree: pods per phase, spread over the 4 leaves (default 1000; 20 with --tiny)")
    parser.add_argument("--seeds", type=int, default=0, metavar="N",
                        help="placement: seeded fleets, one round each (default 10; 2 with --tiny)")
    args = parser.parse_args(argv)
    if args.from_json:
        if not args.markdown:
            parser.error("--from-json needs --markdown OUT (it only re-renders)")
        merged: dict[str, Any] = {}
        for path in args.from_json:
            try:
                earlier = json.loads(Path(path).read_text())
            except (OSError, ValueError) as e:
                parser.error(f"--from-json {path}: cannot read: {e}")
            merged = merge_runs(merged, earlier)
        Path(args.markdown).write_text(render_markdown(merged))
        return 0
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)} on the command line; known: {', '.join(BENCHMARKS)}")
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.pods < 0:
        parser.error(f"--pods must be at least 1, got {args.pods}")
    if args.seeds < 0:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.tree_pods < 0:
        parser.error(f"--tree-pods must be at least 1, got {args.tree_pods}")
    opts = bc.Options(repeat=args.repeat, tiny=args.tiny, n=args.n, budget_s=args.budget, shapes=args.shape,
                      relays=args.relays,
                      sched_nodes=args.nodes, sched_pods=args.pods, tree_pods=args.tree_pods, seeds=args.seeds)
    # Pre-flight: refuse named benchmarks that cannot run; skip (with the reason) unnamed ones.
    chosen: list[tuple[str, ModuleType]] = []
    skipped: dict[str, str] = {}
    refusals: list[str] = []
    for name in args.names or list(BENCHMARKS):
        bench = BENCHMARKS[name]
        if not bench.supported():
            why = "this build does not have the capability it measures yet"
        else:
            why = "; ".join(bench.load().requires(opts))
        if why:
            (refusals if args.names else []).append(f"{name}: {why}")
            skipped[name] = why
        else:
            chosen.append((name, bench.load()))
    if refusals or not chosen:
        for line in refusals or [f"{k}: {v}" for k, v in skipped.items()]:
            print(f"fabric-tool bench: cannot run {line}", file=sys.stderr)
        return 2
    for name, why in skipped.items():
        print(f"fabric-tool bench: skipping {name}: {why}", file=sys.stderr)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    previous = signal.signal(signal.SIGTERM, _sigterm)
    doc: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "repeat": args.repeat,
            "command": "fabric-tool bench " + " ".join(argv),
            "skipped": skipped,
        }
    }
    try:
        for name, module in chosen:
            report = module.run(opts)
            doc[name] = _to_json(report)
            print(f"== {name} ({args.repeat} round{'s' if args.repeat > 1 else ''}; ratios: higher is better)")
            print(render_text(doc[name]), flush=True)
    except KeyboardInterrupt:
        print("fabric-tool bench: interrupted; everything it started has been cleaned up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2, sort_keys=True, allow_nan=False)
            fh.write("\n")
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(render_markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
