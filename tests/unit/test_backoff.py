"""fabric.backoff: growth, cap, reset and the jitter range, with seeded generators."""

from __future__ import annotations

import random

import pytest

from fabric.backoff import Backoff


def test_without_jitter_delays_double_up_to_the_maximum() -> None:
    b = Backoff(0.2, 5.0, jitter=0.0)
    assert [b.next() for _ in range(8)] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
    assert b.attempts == 8


def test_factor_is_honoured() -> None:
    b = Backoff(1.0, 100.0, factor=3.0, jitter=0.0)
    assert [b.next() for _ in range(4)] == pytest.approx([1.0, 3.0, 9.0, 27.0])


def test_reset_starts_over_at_initial() -> None:
    b = Backoff(0.5, 30.0, jitter=0.0)
    for _ in range(5):
        b.next()
    assert b.delay == 16.0 and b.attempts == 5
    b.reset()
    assert b.attempts == 0
    assert b.next() == 0.5 and b.next() == 1.0


def test_equal_jitter_stays_in_the_upper_half_and_covers_it() -> None:
    b = Backoff(1.0, 1.0, rng=random.Random(42))  # nominal delay fixed at 1.0
    waits = [b.next() for _ in range(2000)]
    assert all(0.5 <= w <= 1.0 for w in waits)
    # Spread over the whole range, not stuck at one end (a seeded generator: deterministic).
    assert min(waits) < 0.52 and max(waits) > 0.98
    assert 0.7 < sum(waits) / len(waits) < 0.8


def test_jitter_range_follows_the_nominal_delay_at_every_step() -> None:
    b = Backoff(0.2, 5.0, rng=random.Random(7))
    nominal = [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    for d in nominal:
        w = b.next()
        assert d / 2 <= w <= d, (w, d)


def test_full_jitter_fraction_reaches_down_to_zero() -> None:
    b = Backoff(1.0, 1.0, jitter=1.0, rng=random.Random(3))
    waits = [b.next() for _ in range(2000)]
    assert all(0.0 < w <= 1.0 for w in waits) and min(waits) < 0.02


def test_same_seed_same_waits() -> None:
    a = Backoff(0.2, 5.0, rng=random.Random(1))
    b = Backoff(0.2, 5.0, rng=random.Random(1))
    assert [a.next() for _ in range(10)] == [b.next() for _ in range(10)]


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"initial": 0.0, "maximum": 1.0}, "initial=0.0"),
        ({"initial": 2.0, "maximum": 1.0}, "maximum=1.0"),
        ({"initial": 1.0, "maximum": 2.0, "factor": 0.5}, "factor"),
        ({"initial": 1.0, "maximum": 2.0, "jitter": 1.5}, "jitter"),
    ],
)
def test_bad_parameters_are_named(kwargs: dict[str, float], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        Backoff(**kwargs)
