"""The playground: a page at / to try the service in a browser, plain HTML/CSS/JS from this package's files.

No build step, and nothing from elsewhere (no CDN, no web fonts): the Content-Security-Policy below lets the page
load and call only this server, so what works here works without internet. The page talks to the public API as
any client does: ``POST /v1/jobs`` (multipart, the image as a file part), then the job's event stream for step
progress (polling the job when a stream breaks), with the API key typed into the page sent as ``Authorization:
Bearer``. Off with FLUX_PLAYGROUND=false.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
ASSETS_URL = "/playground"  # auth.PAGE_PREFIX: open, like the page
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; script-src 'self'; style-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"}


def add_playground(app: FastAPI) -> None:
    """``GET /`` the page, ``/playground/*`` its script and style (outside the OpenAPI document)."""
    app.mount(ASSETS_URL, StaticFiles(directory=STATIC_DIR), name="playground")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)
