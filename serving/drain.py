"""Graceful shutdown: on SIGTERM (or SIGINT) the service stops taking work and finishes what
it holds, then exits 0.

1. ``/readyz`` turns 503 at once and every answer closes its connection;
2. the listening socket closes: a new connection is refused (the caller's retry goes to
   another replica, nothing was sent); the connections the kernel had already completed
   but uvicorn not yet taken are taken first (a close would reset them);
3. requests in flight finish; a connection left idle closes at uvicorn's keep-alive timeout
   (5 s) or with the answer to its next request;
4. once no connection is left, or ``--grace_seconds`` after the signal, uvicorn's own shutdown
   runs (it cancels what still runs then) and the process exits 0.

A second SIGINT (Ctrl+C again) stops at once; a repeated SIGTERM changes nothing. With
``--workers N`` uvicorn's supervisor passes SIGTERM to every worker and each drains itself;
the supervisor closes its copy of the socket first (``DrainingSupervisor``), so that new
connections are refused there too.

Why not uvicorn's shutdown alone: it closes at once a keep-alive connection whose next request
was sent but not yet read (the caller reads a reset: a request lost in flight), and it raises
the signal again once done, so the process dies of it (exit -15), which a supervisor reads as
a crash.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from types import FrameType

import uvicorn
from uvicorn.supervisors import Multiprocess

SIGNALS = (signal.SIGTERM, signal.SIGINT)
log = logging.getLogger("ranker.serving")
POLL_S = 0.05


class Drain:
    """The drain of the uvicorn server running this app (``attach`` it at start-up)."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.started = False  # read by /readyz and by every answer
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    def attach(self) -> None:
        """Take SIGTERM / SIGINT over from the uvicorn server running this process (which
        caught them with its ``handle_exit``, in one process or in each worker). Under any
        other server (or a test client), or off the main thread, nothing changes."""
        server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
        if not isinstance(server, uvicorn.Server):
            return
        if threading.current_thread() is not threading.main_thread():
            return
        self._server, self._loop = server, asyncio.get_running_loop()
        for sig in SIGNALS:
            signal.signal(sig, self._signalled)

    def _signalled(self, sig: int, frame: FrameType | None) -> None:
        if self.started:
            if sig == signal.SIGINT:  # Ctrl+C again: stop now, cancelling what runs
                self._server.force_exit = self._server.should_exit = True
            return  # a repeated SIGTERM (a supervisor's and a process group's) changes nothing
        self.started = True
        self._loop.call_soon_threadsafe(self._begin)

    def _begin(self) -> None:
        self._task = self._loop.create_task(self._drain(time.monotonic() + self.grace_s))
        self._task.add_done_callback(self._drained)

    def _drained(self, task: asyncio.Task) -> None:
        """Whatever the drain met, the server stops (``should_exit``, not ``handle_exit``: no
        signal is raised again after it)."""
        if not task.cancelled() and task.exception() is not None:
            log.error("drain failed; stopping now", exc_info=task.exception())
        self._server.should_exit = True

    async def _drain(self, until: float) -> None:
        server = self._server
        while not server.started and time.monotonic() < until:  # a signal during start-up
            await asyncio.sleep(POLL_S)  # (uvicorn binds after the app's start-up)
        loop = asyncio.get_running_loop()
        for listener in server.servers:
            queued = [c for sock in listener._sockets for c in accepted(sock)]
            listener.close()  # new connections are refused from now on
            await asyncio.gather(*(
                loop.connect_accepted_socket(listener._protocol_factory, c, ssl=server.config.ssl)
                for c in queued
            ))  # fmt: skip
        while server.server_state.connections and time.monotonic() < until:
            await asyncio.sleep(POLL_S)
        server.config.timeout_graceful_shutdown = max(0.0, until - time.monotonic())


def accepted(sock: socket.socket) -> list[socket.socket]:
    """The connections the kernel completed on a listening socket and the server has not yet
    taken: closing the socket would reset them (their callers had sent a request: lost), so
    they are taken first and served like the others."""
    taken = []
    while True:
        try:
            connection, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return taken
        connection.setblocking(False)
        taken.append(connection)


class DrainingSupervisor(Multiprocess):
    """uvicorn's supervisor of ``--workers N``, closing its copy of the listening socket on
    SIGTERM / SIGINT before it passes the signal on to the workers (each drains), so that new
    connections are refused once the workers have closed theirs."""

    def handle_term(self) -> None:
        self.close_sockets()
        super().handle_term()

    def handle_int(self) -> None:
        self.close_sockets()
        super().handle_int()

    def close_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()
