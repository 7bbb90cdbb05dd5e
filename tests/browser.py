"""Headless Debian chromium driven by Playwright, for the browser tests (the playground, the docs pages).

Playwright's own browser download cannot run here: the tests use the system's chromium (apt package ``chromium``,
installed by ``./setup_flux_optimized.sh --dev``). Without it, or without the playwright package, the tests skip
and say why; in CI (``CI`` set) they fail instead, because there they must run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    """FLUX_TEST_CHROMIUM, else ``chromium`` on the PATH, else Debian's /usr/bin/chromium."""
    candidates = [os.environ.get("FLUX_TEST_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"]
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


def unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser tests (./setup_flux_optimized.sh --dev installs both)")
    pytest.skip(reason)


@contextmanager
def headless_chromium() -> Iterator[object]:
    """A Playwright Browser on the system chromium."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is not installed (pip install -r requirements-browser.txt)")
    executable = chromium_path()
    if executable is None:
        unavailable("no chromium browser found (apt-get install chromium, or set FLUX_TEST_CHROMIUM)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def offline_page(browser, base: str) -> Iterator[tuple[object, list[str]]]:
    """A page in a fresh context (no storage) that can reach only ``base``: any other request is recorded and
    aborted, as on a machine without internet. Yields (page, the URLs refused, the page's script errors)."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    refused: list[str] = []

    def only_local(route):
        url = route.request.url
        if url.startswith(f"{base}/") or url.startswith(("data:", "blob:")):
            return route.continue_()
        refused.append(url)
        return route.abort()

    context.route("**/*", only_local)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page, refused, errors
    finally:
        context.close()
