"""``ranker serve``: the scoring service under uvicorn (no torch, no lightning)."""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Literal

from serving.model import Fusion, ModelError


def serve(
    *,
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    user_table: Path | None = None,
    item_table: Path | None = None,
    fusion: Literal["sum", "product"] = "sum",
    weights: dict[str, float] | None = None,
    max_candidates: int = 1000,
    max_body_bytes: int = 1_000_000,
    poll_seconds: float = 10.0,
    threads: int | None = None,
    tracking_uri: str | None = None,
    log_level: str = "warning",
) -> None:
    """Serve a ranker ONNX model over HTTP.

    Args:
        model: a .onnx file, models:/<name>@<alias> (followed as it moves), or
            models:/<name>/<version>.
        host: address to bind.
        port: port to bind.
        user_table: user feature snapshot (Parquet) instead of the model's.
        item_table: item feature snapshot (Parquet) instead of the model's.
        fusion: how task probabilities combine: weighted sum or weighted product.
        weights: task -> fusion weight (absent tasks weigh 1), e.g. '{click: 1, like: 4}'.
        max_candidates: the most candidates one request may carry.
        max_body_bytes: the largest request body.
        poll_seconds: how often a registry alias is checked for a new version.
        threads: onnxruntime intra-op threads (default: all cores).
        tracking_uri: MLflow store for models:/ references.
        log_level: uvicorn's log level.
    """
    import uvicorn

    from serving.app import Settings, create_app

    settings = Settings(
        model=model,
        user_table=user_table,
        item_table=item_table,
        fusion=Fusion(fusion, weights or {}),
        max_candidates=max_candidates,
        max_body_bytes=max_body_bytes,
        poll_seconds=poll_seconds,
        tracking_uri=tracking_uri,
        threads=threads,
    )
    try:
        app = create_app(settings)
    except ModelError as err:
        print(f"ranker serve: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    # Everything loaded so far (model, tables, libraries) lives as long as the process: move it
    # out of the collector's reach so a full collection does not pause requests scanning it.
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
