"""Logging configuration for the service and the CLI (level from FLUX_LOG_LEVEL, default INFO)."""

from __future__ import annotations

import logging
import os


def configure_logging() -> None:
    """Give our loggers a handler unless the host application already configured logging."""
    root = logging.getLogger()
    if root.handlers:
        return
    logging.basicConfig(
        level=os.environ.get("FLUX_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
