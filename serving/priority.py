"""The scoring threads' lower priority: on a machine whose cores the scoring saturates, the
event loop (nice 0) still runs the moment a request arrives, so a 503, a 504 or a health check
is answered in a millisecond or two, not after the scoring's time slice (measured at 4x the
capacity, 2 cores: 503 p99 8-11 ms at the same priority, 4-5 ms with the scoring at nice 10).

Linux keeps a niceness per thread and a thread starts with its creator's: the thread that scores
lowers its own, and the model is loaded in a lowered thread, so the intra-op threads onnxruntime
creates with each session inherit it. Raising one's niceness needs no privilege (lowering it
back does, so it is never done on a thread that does anything else). Elsewhere nothing changes.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("ranker.serving")


def lower_priority(nice: int) -> None:
    """This thread's niceness raised to at least ``nice`` (Linux; a no-op elsewhere, where
    ``setpriority`` by thread id would name a process)."""
    if sys.platform != "linux" or nice <= 0:
        return
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as err:  # a sandbox that forbids it: serve at the same priority
        log.warning("scoring threads keep the event loop's priority: %s", err)


def run_lowered(nice: int, fn: Callable[[], T]) -> T:
    """``fn()`` on a new thread at niceness ``nice``; its result or its exception here. The
    threads ``fn`` starts (onnxruntime's, for a session made in it) keep that niceness."""
    outcome: list = []

    def lowered() -> None:
        lower_priority(nice)
        try:
            outcome.append((True, fn()))
        except BaseException as err:  # raised again on the calling thread
            outcome.append((False, err))

    thread = threading.Thread(target=lowered, name="lowered-priority")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
