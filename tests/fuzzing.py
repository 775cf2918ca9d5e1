"""The one budget of the property-based fuzz tests (hypothesis).

CI runs a fixed number of examples per property with a fixed seed (``derandomize``), so a run is
repeatable and its time bounded; a long run is the same tests with a bigger budget and fresh
randomness:

    FABRIC_FUZZ_EXAMPLES=20000 ./dev.sh test -m fuzz

(with ``FABRIC_FUZZ_EXAMPLES`` set, ``dev.sh test`` lifts pytest-timeout's per-test limit: a long
run of one property takes as long as its budget).

Every fuzz test takes its settings from :func:`budget` (decorate with ``@budget()``) and carries
the ``fuzz`` marker, so the long run selects exactly them.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings

#: Examples per property in CI (and in a plain ``./dev.sh test``).
CI_EXAMPLES = 200


def examples() -> int:
    """Examples per property: ``FABRIC_FUZZ_EXAMPLES`` or the CI budget."""
    raw = os.environ.get("FABRIC_FUZZ_EXAMPLES", "")
    if not raw:
        return CI_EXAMPLES
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"FABRIC_FUZZ_EXAMPLES={raw!r}: expected a positive whole number")
    return int(raw)


def budget(scale: float = 1.0, **overrides: Any) -> settings:
    """Settings for one property: ``scale`` x the example budget (a slow property, e.g. one that
    runs a live server per example, takes a fraction), derandomized unless a long run was asked
    for, no deadline (a loaded CI machine is not a failure) and no database (runs are
    independent)."""
    long_run = bool(os.environ.get("FABRIC_FUZZ_EXAMPLES"))
    return settings(
        max_examples=max(1, int(examples() * scale)),
        derandomize=not long_run,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **overrides,
    )
