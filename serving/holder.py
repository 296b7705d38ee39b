"""The model being served: one immutable ``LoadedModel``, swapped by one reference.

A request reads ``holder.current`` once and uses that object throughout, so it scores, fuses
and labels its answer with one version's session, tasks and weights, whatever a reload does
meanwhile. Nothing a loaded model needs stays on disk (``serving.registry`` removes the
download once the session and tables are in memory), so a replaced version is freed with the
last request that holds it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from features.contract import Fusion
from serving.core.config import Settings
from serving.core.metrics import Metrics
from serving.model import ModelError, Scorer
from serving.priority import run_lowered
from serving.registry import load_scorer, parse, resolve_version

log = logging.getLogger("ranker.serving")


@dataclass(frozen=True)
class LoadedModel:
    """A scorer with the fusion rule and the weights of its own task list."""

    scorer: Scorer
    fusion: Fusion
    weights: np.ndarray  # [T], in ``scorer.tasks`` order

    @classmethod
    def of(cls, scorer: Scorer, fusion: Fusion) -> LoadedModel:
        """Refuses (``ModelError``) fusion weights naming a task the model lacks."""
        try:
            return cls(scorer, fusion, fusion.vector(scorer.tasks))
        except ValueError as err:
            raise ModelError(str(err)) from None

    def fuse(self, probabilities: np.ndarray) -> np.ndarray:
        """``[N, T]`` probabilities -> ``[N]`` ranking scores."""
        return self.fusion(probabilities, self.weights)

    @property
    def label(self) -> tuple[str, str]:
        return self.scorer.name, self.scorer.version


STOP_TIMEOUT_S = 60.0  # the longest a shutdown waits for a load under way


class Holder:
    """The current ``LoadedModel`` and, for a registry alias, the thread that follows it."""

    def __init__(self, settings: Settings, metrics: Metrics, threads: int) -> None:
        self.settings, self.metrics, self.threads = settings, metrics, threads
        self.current: LoadedModel | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def load(self, version: str | None = None) -> LoadedModel:
        """The model (``version`` of an alias, else as set), its sessions made on a thread at
        ``--scoring_nice``: onnxruntime's threads inherit it (``serving.priority``)."""
        settings = self.settings
        scorer = run_lowered(
            settings.scoring_nice, lambda: load_scorer(settings, self.threads, version)
        )
        return LoadedModel.of(scorer, self.settings.fusion_rule)

    def install(self, loaded: LoadedModel) -> None:
        replaced = self.current.label if self.current is not None else None
        self.current = loaded  # the one write a reload makes
        self.metrics.serving(*loaded.label, replaced)

    def follows_alias(self) -> bool:
        model = self.settings.model
        return model.startswith("models:/") and parse(model)[1] is not None

    def start_polling(self) -> None:
        if self.follows_alias():
            self._poller = threading.Thread(target=self.poll, name="model-reload", daemon=True)
            self._poller.start()

    def poll(self) -> None:
        """Reload when the alias points at another version; keep serving on any failure."""
        while not self._stop.wait(self.settings.poll_seconds):
            try:
                version = resolve_version(self.settings.model, self.settings.tracking_uri)
                if self.current is not None and version == self.current.scorer.version:
                    continue
                self.install(self.load(version))
                self.metrics.reloads.labels("ok").inc()
                log.warning("now serving %s version %s", *self.current.label)
            except Exception:  # a bad new version must not take the service down
                self.metrics.reloads.labels("failed").inc()
                log.exception(
                    "reload of %s failed; still serving the previous version", self.settings.model
                )

    def stop(self) -> None:
        """Stop following the alias; a load under way finishes first (and removes its files)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=STOP_TIMEOUT_S)
