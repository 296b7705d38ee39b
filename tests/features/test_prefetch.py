"""The prefetch thread: the same items in the same order, errors where they belong, no thread
left behind."""

from __future__ import annotations

import threading
import time

import pytest

from features.prefetch import prefetched


def _threads() -> int:
    return sum(t.name == "ranker-prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("depth", [0, 1, 4])
def test_every_item_in_order(depth: int) -> None:
    assert list(prefetched(iter(range(100)), depth)) == list(range(100))
    assert _threads() == 0


def test_made_ahead_of_the_consumer() -> None:
    made: list[int] = []

    def items():
        for i in range(10):
            made.append(i)
            yield i

    it = prefetched(items(), depth=3)
    assert next(it) == 0
    deadline = time.monotonic() + 5
    while len(made) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    # one taken, three queued, and at most one more waiting to be queued: never the rest
    assert 4 <= len(made) <= 5
    it.close()


def test_an_error_is_raised_in_the_consumer_after_the_items_before_it() -> None:
    def items():
        yield 1
        yield 2
        raise ValueError("row group 3 is corrupt")

    got = []
    with pytest.raises(ValueError, match="row group 3 is corrupt"):
        for item in prefetched(items(), depth=2):
            got.append(item)
    assert got == [1, 2]
    assert _threads() == 0


def test_closing_early_stops_the_thread_and_closes_the_source() -> None:
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    for item in prefetched(endless(), depth=2):
        if item == 5:
            break
    assert closed.wait(5)
    assert _threads() == 0


def test_an_error_in_the_step_stops_the_thread() -> None:
    closed = threading.Event()

    def endless():
        try:
            yield from iter(int, 1)  # zeros, forever
        finally:
            closed.set()

    with pytest.raises(RuntimeError, match="the step failed"):
        for _ in prefetched(endless(), depth=2):
            raise RuntimeError("the step failed")
    assert closed.wait(5)
    assert _threads() == 0
