"""Batches made ahead of the training step, on a thread of the training process.

In-process loading (``--data.num_workers 0``, the default on few cores) otherwise reads,
joins and transforms the next row group between two steps, while the step waits. A thread
overlaps it with the step: polars, pyarrow, numpy and torch's kernels release the GIL, so the
two run at once, and nothing is pickled between processes (a loader worker's cost).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from queue import Empty, Full, Queue
from typing import TypeVar

T = TypeVar("T")

_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """``items`` in order, made by a background thread up to ``depth`` ahead of the consumer.

    An exception raised making an item is raised here, in the consumer, where the item would
    have come. Closing this iterator early (a ``break``, an exception in the step, garbage
    collection) stops the thread at its next item and waits for it.
    """
    if depth < 1:
        yield from items
        return
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.05)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as error:  # handed to the consumer, raised there
            put(_Failed(error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="ranker-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = queue.get(timeout=1.0)
            except Empty:
                if not thread.is_alive() and queue.empty():
                    raise RuntimeError("the batch prefetch thread ended without a result") from None
                continue
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        if thread is not threading.current_thread():  # finalised by the garbage collector there
            thread.join()
