"""What the routes depend on, passed in from the app's state (no module globals)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serving.api.admission import Admission
from serving.core.config import Settings
from serving.core.metrics import Metrics
from serving.drain import Drain
from serving.holder import Holder


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_holder(request: Request) -> Holder:
    return request.app.state.holder


def get_admission(request: Request) -> Admission:
    return request.app.state.admission


def get_drain(request: Request) -> Drain:
    return request.app.state.drain


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
HolderDep = Annotated[Holder, Depends(get_holder)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]
DrainDep = Annotated[Drain, Depends(get_drain)]
