"""The request and response bodies of ``/v1/rank`` (validated by pydantic; a bad field is a
422 naming it)."""

from __future__ import annotations

from typing import Annotated

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

# A feature value: an id, a category or a number; NaN / inf are refused by the schema.
FiniteValue = int | Annotated[float, Field(allow_inf_nan=False)] | str | None


class User(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int | str = Field(description="the user id, as logged")
    features: dict[str, FiniteValue] = Field(
        default_factory=dict, description="user features that override the user table"
    )
    history: dict[str, list[int | str]] = Field(
        default_factory=dict,
        description=(
            "behaviour sequences by feature name (GET /v1/model lists them: inputs with a "
            "length), each a list of ids, most recent last; it overrides the user table's "
            "history. Longer than the feature's length: only the most recent are kept. "
            "Unknown ids score through the unknown bucket."
        ),
    )


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int | str = Field(description="the item id, as logged")
    features: dict[str, FiniteValue] | None = Field(
        default=None, description="item features that override the item table"
    )


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: User
    context: dict[str, FiniteValue] = Field(default_factory=dict)
    candidates: list[Candidate] = Field(min_length=1)
    top_k: int | None = Field(default=None, ge=1, description="return only the best k")


class Scored(BaseModel):
    id: int | str
    score: float
    probabilities: dict[str, float]


class RankResponse(BaseModel):
    model: dict[str, str]
    candidates: list[Scored]


def error(
    status: int, loc: list, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """Every error answer of the service: ``{"detail": [{"loc": ..., "msg": ...}]}``, as
    FastAPI's own 422s."""
    body = {"detail": [{"loc": loc, "msg": message}]}
    return JSONResponse(body, status_code=status, headers=headers)
