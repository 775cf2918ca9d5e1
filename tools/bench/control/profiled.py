"""``python -m tools.bench.control profiled-reflector --out DIR -- ARGS``: the fabric-reflector
under cProfile, for finding where its time goes in a ``bench control`` run.

The driver starts the reflector this way when ``FABRIC_BENCH_PROFILE=DIR`` is set and sends
SIGUSR1 at the end of each part of a phase (bring-up, settle); each SIGUSR1 writes the profile
of the part that ended (``DIR/<shape>-n<N>-<part>.prof``) and starts a fresh one, so bring-up
and changes are read apart (``python -m pstats FILE``). cProfile slows the reflector (about 2x
on its Python-heavy paths): the figures of a profiled run are not the benchmark's figures.
"""

from __future__ import annotations

import cProfile
import gc
import json
import logging
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

_log = logging.getLogger(__name__)

#: The parts of a phase, in the order the driver ends them (SIGUSR1 each); the rest is "changes".
PARTS = ("bringup", "settle")


def profiled_main(out: Path, label: str, argv: Sequence[str]) -> int:
    """Run ``fabric.control.reflector_cli.main(argv)`` under cProfile (see the module docstring)."""
    from fabric.control import reflector_cli

    out.mkdir(parents=True, exist_ok=True)
    parts = iter(PARTS)
    prof = cProfile.Profile()
    # The cyclic garbage collector's pauses, per generation: count, seconds, longest (they do
    # not show in cProfile, which charges them to whatever function allocated).
    gc_stats: dict[int, list[float]] = {g: [0, 0.0, 0.0] for g in range(3)}
    gc_started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
            return
        took = time.perf_counter() - gc_started[0]
        st = gc_stats[info["generation"]]
        st[0] += 1
        st[1] += took
        st[2] = max(st[2], took)

    gc.callbacks.append(on_gc)

    def dump(part: str) -> None:
        nonlocal prof
        prof.disable()
        prof.dump_stats(str(out / f"{label}-{part}.prof"))
        (out / f"{label}-{part}.gc.json").write_text(json.dumps(
            {f"gen{g}": {"count": c, "seconds": round(t, 3), "longest_s": round(m, 3)}
             for g, (c, t, m) in gc_stats.items()} | {"objects": len(gc.get_objects())}))  # fmt: skip
        for st in gc_stats.values():
            st[:] = [0, 0.0, 0.0]
        prof = cProfile.Profile()
        prof.enable()

    def on_usr1(signum: int, frame: FrameType | None) -> None:
        dump(next(parts, "extra"))

    signal.signal(signal.SIGUSR1, on_usr1)
    prof.enable()
    try:
        return reflector_cli.main(list(argv))
    finally:
        dump("changes")
        prof.disable()
