"""Kubernetes resource quantities (``500m``, ``8Gi``, ``1.5``, ``2e3``), parsed exactly.

The grammar is upstream's (``k8s.io/apimachinery/pkg/api/resource``)::

    <quantity> ::= <signedNumber><suffix>
    <suffix>   ::= Ki | Mi | Gi | Ti | Pi | Ei | n | u | m | "" | k | M | G | T | P | E
                 | (e|E)<signedNumber>

Values are kept as :class:`fractions.Fraction` so nothing is lost to floating point; the
kubelet's arithmetic then uses :func:`milli_value` (CPU, rounded up as ``MilliValue()``) and
:func:`value` (everything else, rounded up as ``Value()``), exactly the integers upstream's
admission messages print.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": Fraction(1),
            "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
            "P": Fraction(10**15), "E": Fraction(10**18)}

#: The whole grammar as one pattern (also what the topology file checks, in fabric.topology).
QUANTITY_RE = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")


class QuantityError(ValueError):
    """A string that is not a Kubernetes quantity; the message names it."""


def parse(text: str | int | float) -> Fraction:
    """The exact value of a quantity. Ints (YAML ``pods: 110``) are accepted as they are."""
    if isinstance(text, bool):
        raise QuantityError(f"{text!r} is not a quantity")
    if isinstance(text, int):
        return Fraction(text)
    if isinstance(text, float):
        return Fraction(str(text))
    m = QUANTITY_RE.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise QuantityError(f"{text!r} is not a quantity (expected e.g. '500m', '4', '8Gi', '1.5G', '2e3')")
    number = Fraction(m.group(1))
    suffix = m.group(2) or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * _DECIMAL[suffix]
    return number * Fraction(10) ** int(suffix[1:])


def value(q: str | int | float | Fraction) -> int:
    """``Quantity.Value()``: the value rounded up to an integer."""
    f = q if isinstance(q, Fraction) else parse(q)
    return math.ceil(f)


def milli_value(q: str | int | float | Fraction) -> int:
    """``Quantity.MilliValue()``: the value in thousandths, rounded up (CPU is counted in these)."""
    f = q if isinstance(q, Fraction) else parse(q)
    return math.ceil(f * 1000)


def scaled(resource: str, q: str | int | float | Fraction) -> int:
    """The integer the kubelet compares for ``resource``: millicores for ``cpu``, else the value."""
    return milli_value(q) if resource == "cpu" else value(q)


def format_value(resource: str, amount: int) -> str:
    """A canonical string for an integer amount from :func:`scaled` (``4000`` cpu -> ``"4"``)."""
    if resource == "cpu":
        return str(amount // 1000) if amount % 1000 == 0 else f"{amount}m"
    if resource in ("memory", "ephemeral-storage") or resource.startswith("hugepages-"):
        for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
            if amount and amount % _BINARY[suffix] == 0:
                return f"{amount // _BINARY[suffix]}{suffix}"
    return str(amount)
