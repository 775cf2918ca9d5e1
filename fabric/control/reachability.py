"""Per cluster-pair reachability as add-on records: the fabric's answer to "can pods of cluster A
reach cluster B through the fabric right now, and how well".

The reflector publishes one record of kind :data:`KIND` per ordered pair of member clusters
(``source`` -> ``target``), named :func:`record_name`, under its own publisher identity
:data:`PUBLISHER`. Add-ons read them with :class:`fabric.control.records.RecordWatch` (the
multi-cluster services controller marks a cut-off cluster's endpoints not ready in every
importer; the tree manager and the scheduler filter and score leaves by them). The record's
bytes are :func:`encode` of a :class:`PairState`; :func:`decode` checks every field and raises
:class:`~fabric.control.codec.DecodeError` naming the record and the field.

Readers: watch ``RecordWatch(target, KIND, PUBLISHER)``. Naming the publisher matters: no
certificate may publish this kind and no session may claim :data:`PUBLISHER`
(fabric.control.record_store, rule 7), but on a plaintext reflector (``--insecure``) any
publisher can write the kind under its own identity. No record for a pair means no answer: the
cluster is not in the configuration, or the reflector is in its startup hold (it publishes
nothing until its topology is complete) or a fresh leader's records are not out yet; readers
should keep what they had (or treat the pair as reachable) rather than call it cut off.

Records are directional: a pair can be cut in one direction only (a one-way filter), and RTT
and loss are measured by the source cluster's nodes.

The reflector derives the states with :func:`fabric.control.reachability_rules.derive` (kept
apart: it needs the planner, which add-ons must not import).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from fabric.control.codec import DecodeError

#: The record kind.
KIND = "fabric.kosmos.io/reachability"
#: ``schema`` of the record's JSON: bumped only for a change old readers would misread.
SCHEMA = "fabric.kosmos.io/reachability/v1"
#: The reflector's own publisher identity for the records it derives itself.
PUBLISHER = "fabric/reflector"


@dataclass(frozen=True, slots=True)
class PairState:
    """Whether pods of cluster ``source`` reach cluster ``target`` through the fabric.

    ``reason`` is one sentence a user can act on (why unreachable, or what the answer rests on);
    ``rtt_ms`` and ``loss`` (a fraction, 0..1) are the source's measurements of the pair's
    tunnels, None when nothing measured them yet."""

    source: str
    target: str
    reachable: bool
    reason: str
    rtt_ms: float | None = None
    loss: float | None = None


def round_rtt(ms: float) -> float:
    """An RTT (ms) as the records carry it: two significant digits (0.43, 1.2, 15, 120 ms), steps
    of 1-10 %, so jitter does not re-put records. Agents judge their reports at this rounding
    too (fabric/agent/quality.py): a move the records cannot show is not worth a report."""
    if ms <= 0:
        return 0.0
    return round(ms, 1 - math.floor(math.log10(ms)))


def round_loss(loss: float) -> float:
    """A loss ratio as the records carry it: hundredths."""
    return round(loss, 2)


def record_name(source: str, target: str) -> str:
    """The record name of the pair ``source`` -> ``target`` (cluster names hold no ``/``)."""
    return f"{source}/{target}"


def encode(state: PairState) -> bytes:
    """The record's bytes: compact JSON with sorted keys, so an unchanged state is an unchanged
    record (no version bump, nothing sent to subscribers)."""
    doc: dict[str, object] = {
        "schema": SCHEMA,
        "source": state.source,
        "target": state.target,
        "reachable": state.reachable,
        "reason": state.reason,
    }
    if state.rtt_ms is not None:
        doc["rttMs"] = round(state.rtt_ms, 3)
    if state.loss is not None:
        doc["loss"] = round(state.loss, 4)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def decode(data: bytes, name: str = "") -> PairState:
    """A record's bytes as a :class:`PairState`; raises DecodeError naming ``name`` and the field."""
    where = f"reachability record {name!r}" if name else "reachability record"
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise DecodeError(f"{where}: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise DecodeError(f"{where}: not a JSON object")
    if doc.get("schema") != SCHEMA:
        raise DecodeError(f"{where}: schema {doc.get('schema')!r}, this reader knows {SCHEMA!r}")
    for field in ("source", "target", "reason"):
        if not isinstance(doc.get(field), str):
            raise DecodeError(f"{where}: {field} must be a string, got {doc.get(field)!r}")
    if not isinstance(doc.get("reachable"), bool):
        raise DecodeError(f"{where}: reachable must be true or false, got {doc.get('reachable')!r}")
    rtt, loss = doc.get("rttMs"), doc.get("loss")
    if rtt is not None and (isinstance(rtt, bool) or not isinstance(rtt, int | float) or not math.isfinite(rtt)
                            or rtt < 0):
        raise DecodeError(f"{where}: rttMs must be a number >= 0, got {rtt!r}")
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, int | float) or not 0 <= loss <= 1):
        raise DecodeError(f"{where}: loss must be a number in [0, 1], got {loss!r}")
    if name and name != record_name(doc["source"], doc["target"]):
        raise DecodeError(f"{where}: names the pair {doc['source']} -> {doc['target']}")
    return PairState(doc["source"], doc["target"], doc["reachable"], doc["reason"],
                     None if rtt is None else float(rtt), None if loss is None else float(loss))  # fmt: skip
