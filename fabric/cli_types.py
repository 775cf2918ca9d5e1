"""Argument types shared by the agent's configuration table, the add-ons and the operator tools.

One place, so that ``fabric-agent --resync-period``, ``fabric lab up --timeout`` and
``fabric-bench --budget`` refuse the same values (NaN, infinities, zero, negatives) the same way,
and ``fabric-agent --reflector`` and ``kosmos-tree --reflector`` the same targets.
It sits at the bottom of ``fabric`` (standard library only) so that both the agent and
``tools`` can import it without an upward dependency.
"""

from __future__ import annotations

import argparse
import math


class NotPositiveError(argparse.ArgumentTypeError, ValueError):
    """A value that is not a finite positive number.

    An :class:`argparse.ArgumentTypeError` so that argparse prints the message as it is, and a
    :class:`ValueError` so that the agent's configuration loader (which catches ``ValueError``
    and adds the flag and the source) reports it too.
    """


class BadTargetError(argparse.ArgumentTypeError, ValueError):
    """A gRPC target that is neither HOST:PORT nor unix:/path (both kinds, as NotPositiveError)."""


def grpc_target(text: str) -> str:
    """A gRPC target as the fabric's clients take it: ``HOST:PORT`` or ``unix:/path``."""
    if text.startswith("unix:"):
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadTargetError(f"{text!r} is not HOST:PORT or unix:/path")
    return text


def _positive(text: str, noun: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise NotPositiveError(f"{text!r} is not a {noun}") from None
    if not math.isfinite(value) or value <= 0:
        raise NotPositiveError(f"{text!r} must be a positive {noun}")
    return value


def positive_float(text: str) -> float:
    """A finite number greater than zero (argparse ``type=``)."""
    return _positive(text, "number")


def positive_seconds(text: str) -> float:
    """A finite number of seconds greater than zero (argparse ``type=``); the error says seconds."""
    return _positive(text, "number of seconds")


def boolean(text: str) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``, any case), as Kubernetes components'
    boolean flags take them (``--leader-elect=false``); argparse ``type=``."""
    t = text.strip().lower()
    if t in ("true", "1", "yes"):
        return True
    if t in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")
