"""``ranker serve``: the scoring service under uvicorn (no torch, no lightning). Its options are
the fields of ``serving.core.config.Settings``, parsed by pydantic-settings."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

from pydantic import ValidationError
from pydantic_settings import CliApp, SettingsError

from serving.core.config import Settings
from serving.core.metrics import MULTIPROCESS_DIR
from serving.model import ModelError


def fail(message: str) -> SystemExit:
    print(f"ranker serve: error: {message}", file=sys.stderr)
    return SystemExit(2)


def parse(args: Sequence[str]) -> Settings:
    """The settings from the command line (over ``RANKER_SERVE_*`` variables); a bad value is
    an error naming the option."""
    try:
        return CliApp.run(Settings, cli_args=list(args))
    except ValidationError as err:
        problems = "; ".join(
            f"--{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise fail(problems) from None
    except SettingsError as err:
        raise fail(str(err)) from None


def serve(args: Sequence[str]) -> None:
    settings = parse(args)
    if settings.workers == 1:
        run_one(settings)
    else:
        run_workers(settings)


def run_one(settings: Settings) -> None:
    import uvicorn

    from serving.main import create_app

    try:
        app = create_app(settings)
    except ModelError as err:
        raise fail(str(err)) from None
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False
    )


def run_workers(settings: Settings) -> None:
    """``N`` uvicorn worker processes on one socket, each loading its own model from the
    ``RANKER_SERVE_*`` environment; Prometheus values shared through a directory removed at
    exit."""
    import uvicorn

    from serving.core.metrics import Metrics
    from serving.drain import DrainingSupervisor
    from serving.holder import Holder  # the model is checked here once, then each worker loads

    try:
        Holder(settings, Metrics(), 1).load()
    except ModelError as err:
        raise fail(str(err)) from None
    shared = tempfile.mkdtemp(prefix="ranker-metrics-")
    os.environ.update(settings.environment())
    os.environ[MULTIPROCESS_DIR] = shared
    config = uvicorn.Config(
        "serving.main:worker_app",
        factory=True,
        workers=settings.workers,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
    )
    try:  # as uvicorn.run does for workers, with a supervisor that drains
        DrainingSupervisor(config, sockets=[config.bind_socket()]).run()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
