"""Admission control of the scoring routes (``POST /v1/rank``, ``/v1/uplift``): a bounded
number of requests per worker, a bounded wait to start scoring, and the optional bearer token
of ``/v1/*``.

- A request arriving while a worker holds ``--max_in_flight`` scoring requests (scoring, or
  waiting for one of its ``--scoring_concurrency`` turns) is answered 503 at once, with
  ``Retry-After``; its body is read and dropped, never parsed. Past capacity a queue only
  adds latency: a burst would become an outage for every caller.
- An admitted request waits for its turn until its deadline: ``--deadline_ms`` after its
  arrival, or sooner if its ``X-Request-Timeout-Ms`` header says so. Past it the answer is
  504 at once, and it is never scored (a late score is worth nothing to a caller that gave up).
  So is a request whose body has not arrived by then: a slow upload cannot hold its place.

Both are counted in ``ranker_requests_shed{reason="overload"|"deadline"}``, and
``ranker_requests_in_flight`` is what the workers hold now. Every count is per event loop: a
worker's middleware and routes run on one thread, so plain integers need no lock.
"""

from __future__ import annotations

import asyncio
import hmac
import math
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.core.config import DEADLINE_HEADER, Settings
from serving.core.metrics import Metrics
from serving.priority import lower_priority
from serving.schemas import error

SCORING_PATHS = frozenset({"/v1/rank", "/v1/uplift"})  # the routes admission controls
DEADLINE = "ranker.deadline"  # the scope key of an admitted request's deadline (loop time)
RETRY_AFTER_S = 1  # what a shed request is told to wait (HTTP takes whole seconds)
SLOW_BODY = "the body had not arrived by the request's deadline; not scored"


class DeadlineError(Exception):
    """A rank request that could not start scoring before its deadline (answered 504)."""

    message = "could not start scoring before its deadline; not scored"


class Admission:
    """A worker's rank requests: how many it holds, whose turn it is to score, and the threads
    that score them (one per turn, at ``--scoring_nice``: ``serving.priority``)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.limit, self.budget_s = settings.max_in_flight, settings.deadline_ms / 1e3
        self.metrics = metrics
        self.held = 0
        self.turns = asyncio.Semaphore(settings.scoring_concurrency)
        self.scoring = ThreadPoolExecutor(
            settings.scoring_concurrency,
            thread_name_prefix="scoring",
            initializer=lower_priority,
            initargs=(settings.scoring_nice,),
        )

    def budget(self, headers: dict[bytes, bytes]) -> float:
        """Seconds a request may wait to score: the setting, lowered by its header (a
        ``ValueError`` for a header that is not a positive number of milliseconds)."""
        given = headers.get(DEADLINE_HEADER.lower().encode())
        if given is None:
            return self.budget_s
        try:
            ms = float(given)
        except ValueError:
            ms = math.nan
        if not ms > 0 or math.isinf(ms):
            shown = given.decode(errors="replace")
            raise ValueError(f"a positive number of milliseconds, got {shown!r}")
        return min(self.budget_s, ms / 1e3)

    @asynccontextmanager
    async def turn(self, deadline: float) -> AsyncIterator[None]:
        """Hold one of the scoring turns, waited for until ``deadline`` (the event loop's
        clock); ``DeadlineError`` when it comes first."""
        try:
            if asyncio.get_running_loop().time() >= deadline:  # a free turn does not wait
                raise TimeoutError
            async with asyncio.timeout_at(deadline):
                await self.turns.acquire()
        except TimeoutError:
            self.metrics.shed.labels("deadline").inc()
            raise DeadlineError() from None
        try:
            yield
        finally:
            self.turns.release()


class Admit:
    """The ASGI middleware in front of the scoring routes: sheds over the limit, stamps the
    deadline of what it admits (``scope["ranker.deadline"]``) and counts it while held."""

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app, self.admission = app, admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in SCORING_PATHS:
            await self.app(scope, receive, send)
            return
        admission = self.admission
        try:
            budget = admission.budget(dict(scope["headers"]))
        except ValueError as err:
            refused = error(422, ["header", DEADLINE_HEADER], str(err))
            await answer_unread(refused, scope, receive, send)
            return
        if admission.held >= admission.limit:
            admission.metrics.shed.labels("overload").inc()
            message = f"overloaded: {admission.held} requests in flight; retry"
            shed = error(503, ["service"], message, {"Retry-After": str(RETRY_AFTER_S)})
            await answer_unread(shed, scope, receive, send)
            return
        deadline = scope[DEADLINE] = asyncio.get_running_loop().time() + budget
        admission.held += 1
        admission.metrics.in_flight.inc()
        started = ours = False  # the app's answer has begun / the 504 was sent instead

        async def timed() -> Message:  # a body still arriving at the deadline: 504, freed
            nonlocal ours
            try:
                async with asyncio.timeout_at(deadline):
                    return await receive()
            except TimeoutError:
                if not (started or ours):
                    ours = True
                    admission.metrics.shed.labels("deadline").inc()
                    await error(504, ["body"], SLOW_BODY)(scope, receive, send)
                return {"type": "http.disconnect"}  # the app stops reading; its answer dropped

        async def guarded(message: Message) -> None:
            nonlocal started
            if ours:
                return
            started = True
            await send(message)

        try:
            await self.app(scope, timed, guarded)
        finally:
            admission.held -= 1
            admission.metrics.in_flight.dec()


async def answer_unread(response: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Answers a request without parsing it. Its body is read and dropped first (``BodyLimit``,
    outside, bounds it): an answer sent before would reset a connection still sending it."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            break
    await response(scope, receive, send)


class BearerToken:
    """A 401 for a ``/v1/*`` request without ``Authorization: Bearer <token>``; the token is
    compared in constant time. ``/healthz``, ``/readyz`` and ``/metrics`` stay open."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
                refused = error(
                    401, ["header", "Authorization"], "a bearer token is required",
                    {"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
                await answer_unread(refused, scope, receive, send)
                return
        await self.app(scope, receive, send)
