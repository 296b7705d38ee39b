"""One scoring request's turn, the same for every scoring route: admitted (``Admit``), it
waits for a scoring turn until its deadline, reads the loaded model once and answers on a
scoring thread, so the event loop keeps admitting, shedding and timing out the others."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response

from serving.api.admission import DEADLINE, Admission
from serving.holder import Holder, LoadedModel

Body = TypeVar("Body")


async def in_turn(
    request: Request,
    admission: Admission,
    holder: Holder,
    body: Body,
    answer: Callable[[Body, LoadedModel], Response],
    refuse: Callable[[LoadedModel], Response | None] = lambda loaded: None,
) -> Response:
    """``answer(body, model)`` in the request's turn, with one version of the model for the
    whole request; ``refuse(model)``, when it returns a response, answers instead."""
    async with admission.turn(request.scope[DEADLINE]):
        loaded = holder.current
        refused = refuse(loaded)
        if refused is not None:
            return refused
        return await asyncio.get_running_loop().run_in_executor(
            admission.scoring, answer, body, loaded
        )
