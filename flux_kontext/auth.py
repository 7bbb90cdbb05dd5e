"""API keys (being built)."""

from __future__ import annotations


class ApiKeyMiddleware:
    """Passes everything through until keys are configured (being built)."""

    def __init__(self, app, settings=None):
        self.app = app

    async def __call__(self, scope, receive, send):
        return await self.app(scope, receive, send)
