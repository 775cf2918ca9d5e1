"""tools.bench.control.relay_model: the fit through the measured Ns, and its extrapolation."""

from __future__ import annotations

from typing import Any

from tools.bench.control import relay_model


def _run(figures: dict[int, dict[str, tuple[float, float]]]) -> dict[str, Any]:
    """A ``bench control --relays 2`` JSON of the gateway shape: per N, what -> (via relays, direct)."""
    control: dict[str, Any] = {}
    for n, whats in figures.items():
        for what, (via, direct) in whats.items():
            control[f"relays2_{what}_gateway_n{n}"] = {"median": via, "baseline_median": direct}
    return {"control": control}


def test_a_cost_per_agent_that_falls_with_n_is_not_extrapolated_below_what_was_measured() -> None:
    """Relays' CPU per agent 1.3 ms at 1,000 and 1.1 at 10,000: the line through them reaches 0 at
    ~66,000 agents; past the Ns measured the model keeps 1.1 (the least measured), while a cost
    that grows with N follows its line."""
    run = _run({
        1000: {"bringup": (2.0, 2.0), "reflector_bringup_cpu_per_agent": (0.5, 1.2),
               "reflector_rss_per_agent": (25.0, 59.0), "relays_bringup_cpu_per_agent": (1.3, 0.0)},
        10000: {"bringup": (20.0, 18.0), "reflector_bringup_cpu_per_agent": (0.8, 1.4),
                "reflector_rss_per_agent": (32.0, 64.0), "relays_bringup_cpu_per_agent": (1.1, 0.0)},
    })  # fmt: skip
    lines = relay_model.model(relay_model.collect([run]), [100_000])
    via = next(i for i, line in enumerate(lines) if line.startswith("2 relays"))
    # 20 relays of 5,000 agents: 1.1 ms x 100,000 / 20 = 5.5 s each (the line would say -11 s).
    assert lines[via + 1].endswith("20 relays of <= 5,000 agents each, 6 s CPU each"), lines[via + 1]
    # The reflector's CPU per agent grows: 0.467 + 0.0333e-3*N -> 3.80 ms at 100,000, 380 s.
    assert "reflector bring-up CPU 380 s" in lines[via + 1], lines[via + 1]
    direct = next(i for i, line in enumerate(lines) if line.startswith("direct"))
    assert "reflector RSS 11,133 MiB" in lines[direct + 1], lines[direct + 1]  # 58.4 + 0.5556e-3*N KiB
