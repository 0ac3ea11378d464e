"""The benches' one timing helper: methods interleaved round by round in rotating order, each call
timed on its own, warm-up rounds untimed, the last result of each method returned."""

import pytest

import bench
from bench import rotation, timed, timed_rounds


def test_rotation_orders_rounds_so_no_method_is_always_first():
    assert [rotation(list("ABC"), r) for r in range(4)] == [list("ABC"), list("BCA"), list("CAB"), list("ABC")]
    assert [rotation(["x", "y"], r) for r in range(3)] == [["x", "y"], ["y", "x"], ["x", "y"]]


class FakeClock:
    """``perf_counter`` for :mod:`bench`: the time moves only when a test advances it."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


def test_timed_rounds_calls_each_method_once_per_round_and_times_only_after_warmup(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    calls = []

    def method(name, seconds):
        def call(r):
            calls.append((name, r))
            clock.now += seconds(r)
            return f"{name}{r}"
        return call

    fns = {"A": method("A", lambda r: 1.0 + r), "B": method("B", lambda r: 0.5)}
    times, last = timed_rounds(fns, rounds=3, warmup=2)
    assert calls == [("A", 0), ("B", 0), ("B", 1), ("A", 1), ("A", 2), ("B", 2), ("B", 3), ("A", 3),
                     ("A", 4), ("B", 4)]
    assert times == {"A": [3.0, 4.0, 5.0], "B": [0.5, 0.5, 0.5]}  # rounds 2-4, each call on its own
    assert last == {"A": "A4", "B": "B4"}


def test_timed_returns_the_result_and_the_duration_of_the_call_alone(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)

    def work():
        clock.now += 0.25
        return 42

    clock.now += 7.0  # time before the call is not counted
    assert timed(work) == (42, 0.25)
    with pytest.raises(ZeroDivisionError):
        timed(lambda: 1 / 0)
