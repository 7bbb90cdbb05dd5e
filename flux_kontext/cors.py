"""CORS: which other origins' web pages may call this API from a browser (FLUX_CORS_ORIGINS; none by default).

Starlette's ``CORSMiddleware`` answers the preflights (``OPTIONS`` with ``Access-Control-Request-Method``) and adds
the headers to every response for an allowed origin, errors included: it sits outside the API-key check, so a
browser can read a 401 too. API keys travel in headers (``Authorization``, ``X-API-Key``), never cookies, so
credentials stay off (which also lets ``*`` mean any origin). The playground at / is the same origin and needs none
of this.
"""

from __future__ import annotations

import logging

from starlette.middleware.cors import CORSMiddleware

log = logging.getLogger(__name__)

ALLOWED_METHODS = ("GET", "POST", "DELETE")
# What a client may send: the body, the key, async preferences, a correlation id; and what its script may read.
ALLOWED_HEADERS = ("Authorization", "X-API-Key", "Content-Type", "Accept", "Prefer", "X-Request-ID")
EXPOSED_HEADERS = ("Location", "Retry-After", "Preference-Applied", "Content-Disposition", "X-Request-ID")
PREFLIGHT_MAX_AGE_S = 600


def add_cors(app, origins: list[str]) -> None:
    """Allow ``origins`` (FLUX_CORS_ORIGINS); no origins: nothing is added and responses carry no CORS headers."""
    if not origins:
        return
    log.info("CORS: browser pages of %s may call this API", ", ".join(origins))
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(origins),
        allow_methods=list(ALLOWED_METHODS),
        allow_headers=list(ALLOWED_HEADERS),
        expose_headers=list(EXPOSED_HEADERS),
        allow_credentials=False,
        max_age=PREFLIGHT_MAX_AGE_S,
    )
