"""The goldens' dict form of plan values: ``dataclasses.asdict`` without the active/active
fields (issue 21 section 2) while they hold their defaults.

Why: a configuration that does not ask for active/active gateways must plan byte-for-byte what
it planned before; leaving the defaults out keeps the goldens written before the feature
unchanged, so they keep proving exactly that (a non-default value still shows up and fails).
"""

from __future__ import annotations

import dataclasses
from typing import Any

#: Fields added for active/active gateways and their defaults.
_NEW_DEFAULTS: dict[str, Any] = {"vias": (), "also_active": (), "active_gateways": 1}


def asdict(obj: Any) -> dict[str, Any]:
    """``dataclasses.asdict(obj)`` minus the active/active fields that hold their defaults."""
    out = dataclasses.asdict(obj)
    for name, default in _NEW_DEFAULTS.items():
        if name in out and out[name] == default:
            del out[name]
    return out
