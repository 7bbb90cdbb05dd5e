"""CORS (FLUX_CORS_ORIGINS): off by default; an allowed origin's preflight is answered and its responses, errors
included, carry the headers a browser needs; other origins get none."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flux_kontext.settings import Settings
from tests.conftest import make_client

ALLOWED = "https://app.example.com"
KEY = "cors-test-key-0123456789"


def preflight(client, origin: str, path: str = "/v1/jobs"):
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, prefer",
    }
    return client.options(path, headers=headers)


def app_client(**settings):
    """The app without its lifespan: no model loads (a loader thread left running would draw from torch's global
    random generator under later tests); CORS and the key check answer before any route."""
    return make_client(**settings)


@pytest.fixture(scope="module")
def cors_client():
    return app_client(cors_origins=[ALLOWED], api_keys=[KEY])


def test_allowed_origin_preflight_is_answered(cors_client):
    response = preflight(cors_client, ALLOWED)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed_headers = response.headers["access-control-allow-headers"].lower()
    assert all(name in allowed_headers for name in ("authorization", "content-type", "prefer"))
    assert "access-control-allow-credentials" not in response.headers  # keys travel in headers, not cookies


def test_other_origins_get_no_cors_headers(cors_client):
    response = preflight(cors_client, "https://elsewhere.example")
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    response = cors_client.get("/health/live", headers={"Origin": "https://elsewhere.example"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_errors_to_an_allowed_origin_are_readable(cors_client):
    """A 401 (no key) still carries the CORS headers, so the page's script can show why."""
    response = cors_client.post("/v1/jobs", json={"prompt": "x"}, headers={"Origin": ALLOWED})
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert "retry-after" in response.headers["access-control-expose-headers"].lower()


def test_off_by_default():
    client = app_client()
    response = preflight(client, ALLOWED)
    assert "access-control-allow-origin" not in response.headers
    assert response.status_code == 405  # no CORS: OPTIONS is just a method no route has
    response = client.get("/health/live", headers={"Origin": ALLOWED})
    assert "access-control-allow-origin" not in response.headers


def test_any_origin():
    response = preflight(app_client(cors_origins=["*"]), "https://anywhere.example")
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("origin", ["https://app.example.com/", "app.example.com", "https://app.example.com/x"])
def test_an_entry_that_is_not_an_origin_is_refused(origin):
    with pytest.raises(ValidationError, match="FLUX_CORS_ORIGINS entry .* must be an origin"):
        Settings(model="tiny", cors_origins=[origin])


def test_origins_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLUX_CORS_ORIGINS", f"{ALLOWED}, http://localhost:3000")
    assert Settings(model="tiny").cors_origins == [ALLOWED, "http://localhost:3000"]
