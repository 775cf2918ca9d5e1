"""Replica division like Karmada's, as pure functions (issue 19 item 5): how many of a workload's
replicas each group (a value of a WorkloadPolicy's ``topologyKey``, e.g. a leaf cluster) should
hold. The plugin :mod:`scheduler.plugins.kosmos_workloadpolicy` turns the targets into Filter
and Score decisions, one pod at a time.

The rules (Karmada's ``pkg/scheduler/core/division_algorithm.go``, with the remainder given by
largest remainder instead of "largest weight first", which Karmada leaves as a TODO):

- :func:`divide` (Hamilton's method): group g of weight w_g out of W = sum of weights gets
  ``floor(R * w_g / W)``; the R - sum(floors) replicas left go one each to the groups with the
  largest fractional parts ``(R * w_g) mod W``, ties to the larger weight, then to the name that
  sorts first. So every target is within 1 of ``R * w_g / W``, targets sum to R (when W > 0),
  and a group of weight 0 gets none.
- :func:`static_weights`: each group's weight is the ``weight`` of the *first* entry of
  ``staticWeightList`` whose ``targetCluster`` matches it (Karmada's ``break``); a group matching
  none has weight 0. If no group has a positive weight, every group gets 1 (Karmada: an unmatched
  list divides evenly).
- :func:`dynamic_targets` (``dynamicWeight: AvailableReplicas``): the weights are the replicas
  each group can hold (its pods already placed plus the pods of this shape that still fit,
  counted node by node by the caller). When they sum to at least R, :func:`divide` by them: a
  target is then never above its group's weight (floor(R w/W) <= w, and a remainder only goes
  where R w/W is not an integer, so below w). When they sum to less than R (Karmada refuses
  the whole workload: "clusters resources are not enough"), every group's target is its weight:
  the pods beyond have no room anywhere and stay Pending on the fit filters.
- :func:`aggregated_targets` (``replicaDivisionPreference: Aggregated``): as few groups as
  possible, Karmada's order: groups already holding pods first, then by room (most first), then
  name; the shortest prefix whose room reaches R is divided dynamically among itself.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StaticWeight:
    """One ``staticWeightList`` entry: which groups it matches (``matches(name)``) and their
    weight. The parsing (names, label selector, exclude) is :mod:`scheduler.policy`'s."""

    matches: Callable[[str], bool]
    weight: int


def divide(replicas: int, weights: Mapping[str, int]) -> dict[str, int]:
    """Largest-remainder division of ``replicas`` by ``weights`` (see the module header). Every
    group of ``weights`` is in the result; all zero when no weight is positive."""
    out = {g: 0 for g in weights}
    total = sum(w for w in weights.values() if w > 0)
    if replicas <= 0 or total <= 0:
        return out
    rems: list[tuple[int, int, str]] = []
    given = 0
    for g, w in weights.items():
        if w <= 0:
            continue
        q, r = divmod(replicas * w, total)
        out[g] = q
        given += q
        rems.append((-r, -w, g))
    rems.sort()
    for _, _, g in rems[:replicas - given]:
        out[g] += 1
    return out


def static_weights(groups: Iterable[str], entries: Sequence[StaticWeight]) -> dict[str, int]:
    """Each group's weight: the first matching entry's, else 0; all 1 when none is positive."""
    names = list(groups)
    weights = {g: next((e.weight for e in entries if e.matches(g)), 0) for g in names}
    if not any(w > 0 for w in weights.values()):
        return dict.fromkeys(names, 1)
    return weights


def dynamic_targets(replicas: int, room: Mapping[str, int]) -> dict[str, int]:
    """Targets weighted by ``room`` (replicas each group can hold); capped at the room when the
    room is short of ``replicas`` (see the module header)."""
    clean = {g: max(0, r) for g, r in room.items()}
    if sum(clean.values()) <= replicas:
        return clean
    return divide(replicas, clean)


def aggregated_targets(replicas: int, room: Mapping[str, int], used: Collection[str] = ()) -> dict[str, int]:
    """As few groups as possible (see the module header); groups not chosen get 0."""
    order = sorted(room, key=lambda g: (g not in used, -max(0, room[g]), g))
    chosen: dict[str, int] = {}
    acc = 0
    for g in order:
        if acc >= replicas:
            break
        if room[g] > 0:
            chosen[g] = room[g]
            acc += room[g]
    out = dict.fromkeys(room, 0)
    out.update(dynamic_targets(replicas, chosen))
    return out
