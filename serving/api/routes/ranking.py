"""``POST /v1/rank`` and ``GET /v1/model``: each reads the loaded model once. A rank request
scores in the thread pool when its turn comes (``serving.api.turn``)."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving.api.deps import AdmissionDep, HolderDep, MetricsDep, SettingsDep
from serving.api.turn import in_turn
from serving.holder import LoadedModel
from serving.model import RequestError
from serving.schemas import RankRequest, RankResponse, json_response

router = APIRouter(prefix="/v1")


@router.get("/model")
def model(holder: HolderDep) -> dict[str, Any]:
    loaded = holder.current
    return {
        **loaded.scorer.describe(),
        "fusion": loaded.fusion.kind,
        "weights": dict(zip(loaded.scorer.tasks, loaded.weights.tolist(), strict=True)),
    }


@router.post(
    "/rank",
    responses={
        200: {"model": RankResponse},
        503: {"description": "overloaded: retry after Retry-After seconds"},
        504: {"description": "the request could not start scoring within its deadline"},
    },
)
async def rank(
    body: RankRequest,
    request: Request,
    holder: HolderDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    admission: AdmissionDep,
) -> Response:
    n = len(body.candidates)
    if n > settings.max_candidates:
        raise RequestError(
            ["body", "candidates"], f"{n} candidates, at most {settings.max_candidates}"
        )

    def counted(body: RankRequest, loaded: LoadedModel) -> Response:  # scored, not shed
        metrics.candidates.observe(n)
        return answer(body, loaded)

    return await in_turn(request, admission, holder, body, counted)


def answer(body: RankRequest, loaded: LoadedModel) -> Response:
    """The scored, fused and sorted candidates, as JSON bytes."""
    scorer = loaded.scorer
    ids = [c.id for c in body.candidates]
    feeds = scorer.feeds(
        body.user.id,
        body.user.features,
        body.context,
        ids,
        [c.features for c in body.candidates],
        body.user.history,
    )
    probs = scorer.score(feeds)
    scores = loaded.fuse(probs)
    order = np.argsort(-scores, kind="stable")[: body.top_k]
    tasks, rows, fused = scorer.tasks, probs[order].tolist(), scores[order].tolist()
    candidates = [
        {"id": ids[i], "score": s, "probabilities": dict(zip(tasks, p, strict=True))}
        for i, s, p in zip(order.tolist(), fused, rows, strict=True)
    ]
    content = {"model": {"name": scorer.name, "version": scorer.version}, "candidates": candidates}
    return json_response(content)
