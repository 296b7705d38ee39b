"""``POST /v1/uplift``: which treatment to give each of a list of users. An uplift model's graph
returns every arm's task probabilities and each treatment's uplift against control
(``features.contract.ARM_OUTPUT`` / ``UPLIFT``); an arm's value for a user is

    value(arm) = sum_t weights[t] * uplift[arm, t] - costs[arm]

and the best arm is the one of highest value among those the request offers, or the control
when none is above 0. Admitted, queued and timed out as ``/v1/rank`` is
(``serving.api.admission``)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving.api.deps import AdmissionDep, HolderDep, SettingsDep
from serving.api.turn import in_turn
from serving.holder import LoadedModel
from serving.model import RequestError, Scorer
from serving.schemas import UpliftRequest, UpliftResponse, error, json_response

router = APIRouter(prefix="/v1")


@router.post(
    "/uplift",
    responses={
        200: {"model": UpliftResponse},
        404: {"description": "the loaded model is not an uplift model"},
        503: {"description": "overloaded: retry after Retry-After seconds"},
        504: {"description": "the request could not start scoring within its deadline"},
    },
)
async def uplift(
    body: UpliftRequest,
    request: Request,
    holder: HolderDep,
    settings: SettingsDep,
    admission: AdmissionDep,
) -> Response:
    n = len(body.users)
    if n > settings.max_users:
        raise RequestError(["body", "users"], f"{n} users, at most {settings.max_users}")
    return await in_turn(request, admission, holder, body, answer, refuse=not_uplift)


def not_uplift(loaded: LoadedModel) -> Response | None:
    """A 404 when the model served is a ranker, not an uplift model."""
    if loaded.scorer.arms:
        return None
    name, version = loaded.label
    return error(404, ["service"], f"{name} version {version} is not an uplift model")


def offered(scorer: Scorer, body: UpliftRequest) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The arms the request chooses among, their columns of the uplift output, their costs;
    an unknown arm (offered or costed) is a ``RequestError`` naming it."""
    treatments = scorer.arms[1:]
    arms = list(dict.fromkeys(body.arms)) if body.arms is not None else treatments
    for i, arm in enumerate(body.arms or []):
        if arm not in treatments:
            raise RequestError(["body", "arms", i], unknown_arm(arm, scorer))
    for arm in body.costs:
        if arm not in scorer.arms:
            raise RequestError(["body", "costs", arm], unknown_arm(arm, scorer))
    columns = np.array([treatments.index(a) for a in arms], dtype=np.int64)
    costs = np.array([body.costs.get(a, 0.0) for a in arms], dtype=np.float64)
    return arms, columns, costs


def unknown_arm(arm: str, scorer: Scorer) -> str:
    return f"unknown arm {arm!r} (treatments: {scorer.arms[1:]}, control: {scorer.arms[0]!r})"


def task_weights(tasks: list[str], weights: Mapping[str, float] | None) -> np.ndarray:
    """``[T]``: 1 per task by default; else the weights named (a task not named weighs 0)."""
    if weights is None:
        return np.ones(len(tasks))
    for task in weights:
        if task not in tasks:
            raise RequestError(["body", "weights", task], f"unknown task {task!r} (tasks: {tasks})")
    return np.array([weights.get(t, 0.0) for t in tasks], dtype=np.float64)


def answer(body: UpliftRequest, loaded: LoadedModel) -> Response:
    """Each user's arms (value, uplift and probabilities per task), best arm and the control's
    probabilities, as JSON bytes."""
    scorer = loaded.scorer
    arms, columns, costs = offered(scorer, body)
    weights = task_weights(scorer.tasks, body.weights)
    users = body.users
    feeds = scorer.user_feeds(
        [u.id for u in users], [u.features for u in users], body.context, [u.history for u in users]
    )
    probabilities, uplift = scorer.uplift(feeds)  # [N, A, T], [N, A-1, T]
    gains = uplift[:, columns].astype(np.float64)  # [N, K, T], the offered arms
    values = gains @ weights - costs  # [N, K]
    best = values.argmax(axis=1)
    best_value = values[np.arange(len(users)), best]
    treat = best_value > 0
    control, tasks = scorer.arms[0], scorer.tasks
    per_task = len(tasks)
    named = [dict(zip(tasks, p, strict=True)) for p in probabilities.reshape(-1, per_task).tolist()]
    gained = [dict(zip(tasks, g, strict=True)) for g in gains.reshape(-1, per_task).tolist()]
    a, k = probabilities.shape[1], len(arms)
    decisions = []
    for i, (user, value_row, b, t) in enumerate(
        zip(users, values.tolist(), best.tolist(), treat.tolist(), strict=True)
    ):
        effects = {
            arm: {
                "value": value_row[j],
                "uplift": gained[i * k + j],
                "probabilities": named[i * a + 1 + int(columns[j])],
            }
            for j, arm in enumerate(arms)
        }
        decisions.append({
            "id": user.id,
            "best_arm": arms[b] if t else control,
            "value": value_row[b] if t else 0.0,
            "control": named[i * a],
            "arms": effects,
        })  # fmt: skip
    model = {"name": scorer.name, "version": scorer.version}
    return json_response({"model": model, "control": control, "users": decisions})
