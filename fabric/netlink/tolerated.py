"""The errnos an owner counts as success: one table for every kernel object kind we own.

A delete that finds the object already gone, or an add that finds our identical object already
there, reached the state we wanted; anything else is a failure (counted, and the next pass
re-reads the kernel). Each owner used to carry its own list and the lists disagreed; they read
this table now.

Already gone, on delete, for every kind:

- ``ENOENT``: the kernel's usual "no such object" (rules, neighbours, FDB entries, nexthops);
- ``ESRCH``: what the FIB answers for a route that is not in the table (IPv4 and IPv6);
- ``ENODEV``: the device is gone, and the kernel flushed everything that hung off it with it
  (addresses, neighbours, FDB entries, nexthops and routes on it; for a link, the link itself).

Addresses add ``EADDRNOTAVAIL``: ``RTM_DELADDR`` answers it (IPv4 and IPv6) for an address that
is not on the device.

Already there, on add: only where the kernel's ``EEXIST`` can only mean *our identical object*:

- addresses: the same address on the same link is the address we want;
- rules: we add with ``NLM_F_EXCL`` and the kernel compares the protocol too, so ``EEXIST`` is
  an identical rule of ours.

Nowhere else: a link that exists although our view lacked it may not be ours (the owner
checks kind before touching it); a route's ``EEXIST`` means a route of another protocol holds the
destination; neighbours and FDB entries are written with replace semantics; nexthop ids are
ours to allocate, so ``EEXIST`` there means our view is wrong.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from types import MappingProxyType

_GONE = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV})

#: table -> errnos that mean "already gone" on delete.
GONE_ON_DELETE: Mapping[str, frozenset[int]] = MappingProxyType(
    {
        "links": _GONE,
        "addresses": _GONE | {errno.EADDRNOTAVAIL},
        "rules": _GONE,
        "neighbours": _GONE,
        "fdb": _GONE,
        "nexthops": _GONE,
        "routes": _GONE,
    }
)

#: table -> errnos that mean "our identical object is already there" on add.
THERE_ON_ADD: Mapping[str, frozenset[int]] = MappingProxyType(
    {
        "links": frozenset(),
        "addresses": frozenset({errno.EEXIST}),
        "rules": frozenset({errno.EEXIST}),
        "neighbours": frozenset(),
        "fdb": frozenset(),
        "nexthops": frozenset(),
        "routes": frozenset(),
    }
)


def already_gone(table: str, code: int) -> bool:
    """True when a delete in ``table`` that failed with ``code`` found the object gone."""
    return code in GONE_ON_DELETE[table]


def already_there(table: str, code: int) -> bool:
    """True when an add in ``table`` that failed with ``code`` found our identical object."""
    return code in THERE_ON_ADD[table]
