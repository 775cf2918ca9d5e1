"""One logging set-up for every fabric process (agent, reflector, tools).

Lines are ``time level logger: message``, messages carry ``key=value`` context where it helps
grep; INFO is one line per state transition, per-entry detail is DEBUG.
"""

from __future__ import annotations

import logging
import sys

LEVELS = ("debug", "info", "warning", "error")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_level(text: str) -> str:
    """Case-insensitive level name -> lower-case canonical name; ValueError names the choices."""
    level = text.strip().lower()
    if level not in LEVELS:
        raise ValueError(f"log level {text!r} is not one of {', '.join(LEVELS)}")
    return level


def setup(level: str) -> None:
    logging.basicConfig(level=getattr(logging, parse_level(level).upper()), format=FORMAT, stream=sys.stderr)
