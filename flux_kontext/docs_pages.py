"""/docs (Swagger UI) and /redoc (ReDoc) from local files: the fastapi-offline package ships both, served under
/docs/assets, so the pages work without internet (FastAPI's own load them from a CDN).

Two things in those bundles would still reach out: Swagger UI's validator badge (turned off) and the logo ReDoc's
sidebar shows from its CDN, which a Content-Security-Policy on the pages (images from this server only) stops
before any request is made (ReDoc then drops the image)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

DOCS_ASSETS_URL = "/docs/assets"  # auth.INFO_PREFIX: open like /docs unless FLUX_AUTH_PROTECT_INFO
DOCS_PAGES = frozenset({"/docs", "/redoc"})
DOCS_POLICY = (b"content-security-policy", b"img-src 'self' data: blob:")


def app_with_local_docs(**kwargs) -> FastAPI:
    """FastAPI(**kwargs) whose /docs and /redoc use the packaged files."""
    return FastAPIOffline(static_url=DOCS_ASSETS_URL, swagger_ui_parameters={"validatorUrl": None}, **kwargs)


class DocsImagePolicy:
    """ASGI middleware: the docs pages may show images from this server only."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in DOCS_PAGES:
            return await self.app(scope, receive, send)

        async def with_policy(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), DOCS_POLICY]}
            await send(message)

        return await self.app(scope, receive, with_policy)
