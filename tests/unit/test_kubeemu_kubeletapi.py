"""kubeemu.kubeletapi's log reading: CRI lines, Go timestamps, tail, since and limitBytes.

The HTTP and WebSocket sides are exercised end to end with the real kubectl in
tests/conformance/test_logs_exec.py; this file pins the rules one at a time.
"""

from __future__ import annotations

import pytest

from kubeemu import kubeletapi
from kubeemu.kubeletapi import LogOptions, LogReader, parse_entry

pytestmark = pytest.mark.unit


def test_parse_entry_and_timestamps() -> None:
    e = parse_entry(b"2024-01-02T03:04:05.000000001Z stderr P a b c")
    assert (e.stream, e.full, e.content) == ("stderr", False, b"a b c")
    assert kubeletapi.format_rfc3339nano(e.ns) == "2024-01-02T03:04:05.000000001Z"
    assert parse_entry(b"2024-01-02T03:04:05Z stdout F").content == b""  # an empty line
    # Go's RFC3339Nano trims trailing zeros, and the fraction when whole
    assert (
        kubeletapi.format_rfc3339nano(kubeletapi.parse_rfc3339("2024-01-02T03:04:05.500Z")) == "2024-01-02T03:04:05.5Z"
    )
    assert (
        kubeletapi.format_rfc3339nano(kubeletapi.parse_rfc3339("2024-01-02T05:04:05+02:00")) == "2024-01-02T03:04:05Z"
    )
    with pytest.raises(ValueError, match="not a CRI log line"):
        parse_entry(b"garbage")


@pytest.mark.parametrize("lines, start", [(0, 9), (1, 6), (2, 3), (3, 0), (10, 0)])
def test_tail_start(lines: int, start: int) -> None:
    assert kubeletapi._tail_start(b"aa\nbb\ncc\n", lines) == start


def _entries(*specs: tuple[int, bool, str]) -> list[kubeletapi.Entry]:
    return [kubeletapi.Entry(ns * 1_000_000_000, "stdout", full, text.encode()) for ns, full, text in specs]


def test_reader_since_limit_and_timestamps() -> None:
    es = _entries((10, True, "old"), (20, False, "pa"), (21, True, "rt"), (30, True, "new"))
    r = LogReader(LogOptions(since_ns=15 * 1_000_000_000))
    assert b"".join(r.render(e) for e in es) == b"part\nnew\n"
    r = LogReader(LogOptions(timestamps=True))
    assert b"".join(r.render(e) for e in es[1:3]) == b"1970-01-01T00:00:20Z part\n"
    r = LogReader(LogOptions(limit_bytes=5))
    assert b"".join(r.render(e) for e in es) == b"old\np" and r.done


def test_log_options_from_query() -> None:
    opts = LogOptions.from_query({"follow": "true", "tailLines": "3", "sinceTime": "2024-01-02T03:04:05Z"})
    assert opts.follow and opts.tail_lines == 3 and opts.since_ns == kubeletapi.parse_rfc3339("2024-01-02T03:04:05Z")
    with pytest.raises(ValueError, match="tailLines: 'x' is not an integer"):
        LogOptions.from_query({"tailLines": "x"})
