"""What the user's screen is spared: third-party tips, deprecation notices and start-up chatter,
filtered in this one place (``ranker <command> --verbose`` keeps everything)."""

from __future__ import annotations

import logging
import warnings

# Lightning's own log lines that say nothing about this run.
CHATTER = (
    "💡 Tip:",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "Seed set to",
    "`weights_only` was not set",
    "Restoring states from the checkpoint path",
    "Loaded model weights from the checkpoint",
)
# Warnings raised inside third-party code about its own (or its dependencies') APIs.
WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # lightning's pytree use, torch 2.13
    r".*Your `IterableDataset` has `__len__` defined",  # ParquetBatches.__len__: an upper bound
    r"The number of training batches .* is smaller than the logging interval",
    r".*was deprecated in v4\.\d+\.\d+ and will be removed",  # jsonargparse, used by LightningCLI
    r".*parameter was deprecated in v4\.\d+",
)


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(c) for c in CHATTER)


def quiet() -> None:
    """Installs the filters (idempotent); Lightning's log handlers once it is imported."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _DropChatter) for f in handler.filters):
                handler.addFilter(_DropChatter())
    for pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    try:
        from jsonargparse import JsonargparseDeprecationWarning
    except ImportError:  # older jsonargparse: no such category
        return
    warnings.filterwarnings("ignore", category=JsonargparseDeprecationWarning)
