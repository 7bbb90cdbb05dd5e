"""Logging configuration for the service and the CLI: FLUX_LOG_LEVEL (default INFO), FLUX_LOG_FORMAT text (default)
or json (one JSON object a line: time, level, logger, request_id, message, exc_info). Every line carries the
request id of the request it was written for ("-" outside one).

What the service logs never holds image bytes, prompts or API keys (tests/test_request_ids.py checks it): log
sizes, counts, types and ids, never request content.
"""

from __future__ import annotations

import logging

from flux_kontext.request_id import RequestIdFilter
from flux_kontext.settings import LoggingSettings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
JSON_FIELDS = ("asctime", "levelname", "name", "request_id", "message")
JSON_NAMES = {"asctime": "time", "levelname": "level", "name": "logger"}


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(list(JSON_FIELDS), rename_fields=JSON_NAMES)
    return logging.Formatter(TEXT_FORMAT)


def configure_logging(settings: LoggingSettings | None = None) -> None:
    """Give our loggers a handler unless the host application already configured logging."""
    root = logging.getLogger()
    if root.handlers:
        return
    settings = settings or LoggingSettings.from_environment()
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(formatter(settings.log_format))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
