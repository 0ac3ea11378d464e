"""The benches' one timing helper: methods interleaved round by round in rotating order, each call
timed on its own, warm-up rounds untimed, the last result of each method returned."""

import pytest

from nbsrc.bench import rotation, timed, timed_rounds


def test_rotation_orders_rounds_so_no_method_is_always_first():
    assert [rotation(list("ABC"), r) for r in range(4)] == [list("ABC"), list("BCA"), list("CAB"), list("ABC")]
    assert [rotation(["x", "y"], r) for r in range(3)] == [["x", "y"], ["y", "x"], ["x", "y"]]


def test_timed_rounds_calls_each_method_once_per_round_and_times_only_after_warmup():
    calls = []
    fns = {name: (lambda r, name=name: calls.append((name, r)) or f"{name}{r}") for name in "AB"}
    times, last = timed_rounds(fns, rounds=3, warmup=2)
    assert calls == [("A", 0), ("B", 0), ("B", 1), ("A", 1), ("A", 2), ("B", 2), ("B", 3), ("A", 3),
                     ("A", 4), ("B", 4)]
    assert {k: len(v) for k, v in times.items()} == {"A": 3, "B": 3} and all(s >= 0 for v in times.values() for s in v)
    assert last == {"A": "A4", "B": "B4"}


def test_timed_returns_the_result_and_a_duration():
    out, seconds = timed(lambda: 41 + 1)
    assert out == 42 and seconds >= 0
    with pytest.raises(ZeroDivisionError):
        timed(lambda: 1 / 0)
