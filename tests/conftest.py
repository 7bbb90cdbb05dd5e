"""Shared fixtures: the tiny model through the real app, image builders, GPU-test skipping."""

from __future__ import annotations

import base64
import io
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from flux_kontext.service import create_app
from flux_kontext.settings import Settings


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def image_bytes(width: int, height: int, fmt: str = "PNG", color=(200, 40, 40)) -> bytes:
    img = Image.new("RGB", (width, height), color)
    for x in range(0, width, 7):  # some structure, so encoders do real work
        img.putpixel((x, (x * 3) % height), (x % 255, 90, 200))
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def image_b64(width: int, height: int, fmt: str = "PNG") -> str:
    return base64.b64encode(image_bytes(width, height, fmt)).decode()


def decode_b64_image(data: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    img.load()
    return img


def wait_ready(client: TestClient, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.get("/health")
        if response.status_code == 200:
            return response.json()
        assert response.status_code == 503, response.text
        if response.json()["state"] == "failed":
            raise AssertionError(f"engine failed: {response.json()['reason']}")
        time.sleep(0.1)
    raise AssertionError("engine did not become ready")


@pytest.fixture(scope="session")
def client():
    """One tiny-model app for the whole session (loading costs seconds), with warm-up on as in production."""
    app = create_app(Settings(model="tiny", max_queue=8))
    with TestClient(app) as test_client:
        wait_ready(test_client)
        yield test_client


def make_client(**settings) -> TestClient:
    """A separate app with its own settings; use as a context manager."""
    return TestClient(create_app(Settings(**{"model": "tiny", "warmup": False, **settings})))


@pytest.fixture(scope="module")
def browser():
    """Headless chromium (tests/browser.py), per module (Playwright's event loop is gone between modules); skipped
    with the reason where it is missing, except in CI."""
    from tests.browser import headless_chromium

    with headless_chromium() as chromium:
        yield chromium
