"""What wraps every request, outermost first: the body limit, the measurement (and the closing
of connections while draining), the bearer token, admission control; and the error answers."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.api.admission import Admission, Admit, BearerToken, DeadlineError
from serving.core.config import Settings
from serving.core.metrics import Metrics
from serving.drain import Drain
from serving.model import RequestError
from serving.schemas import error


class BodyLimit:
    """A 413 for a body over ``limit`` bytes, declared (Content-Length) or streamed (chunked),
    before the app reads it all. It counts what it refuses in ``requests``; a request it cuts
    short is marked in its scope so the inner measurement does not count it twice."""

    def __init__(self, app: ASGIApp, limit: int, requests: Counter) -> None:
        self.app, self.limit, self.requests = app, limit, requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit and not scope.get("ranker.refused"):
                await self._refuse(scope, receive, send)
                return {"type": "http.disconnect"}  # the app stops reading; its answer is dropped
            return message

        async def guarded(message: Message) -> None:
            if not scope.get("ranker.refused"):
                await send(message)

        await self.app(scope, counted, guarded)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["ranker.refused"] = True
        self.requests.labels(scope["path"], "413").inc()
        await error(413, ["body"], f"body over {self.limit} bytes")(scope, receive, send)


class Measure:
    """Counts every answer by path and status and times it to its last byte; while draining,
    every answer closes its connection (the caller's next request opens one elsewhere). Plain
    ASGI: Starlette's ``BaseHTTPMiddleware`` runs each request in a task of its own with
    streams between, work the event loop would do for every shed request too."""

    def __init__(self, app: ASGIApp, metrics: Metrics, drain: Drain) -> None:
        self.app, self.metrics, self.drain = app, metrics, drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500  # an error before any answer is the 500 sent

        async def measured(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.drain.started:
                    MutableHeaders(scope=message)["connection"] = "close"
            await send(message)

        try:
            await self.app(scope, receive, measured)
        finally:
            path = scope["path"]
            if not scope.get("ranker.refused"):  # BodyLimit counted it
                self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


def install(
    app: FastAPI, settings: Settings, metrics: Metrics, admission: Admission, drain: Drain
) -> None:
    """The middlewares (the last added is the outermost) and the error handlers."""
    app.add_middleware(Admit, admission=admission)
    if settings.token is not None:
        app.add_middleware(BearerToken, token=settings.token.get_secret_value())
    app.add_middleware(Measure, metrics=metrics, drain=drain)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, requests=metrics.requests)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        # Location, message and type only: echoing the input back could hold NaN, which JSON
        # cannot carry (and would turn a 422 into a 500).
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in err.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        return error(422, err.loc, err.message)

    @app.exception_handler(DeadlineError)
    async def deadline_passed(request: Request, err: DeadlineError) -> JSONResponse:
        return error(504, ["service"], err.message)
