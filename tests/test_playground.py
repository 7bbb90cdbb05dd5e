"""The playground at / in a real headless browser (Debian's chromium through Playwright), against a live server on
the tiny model with API keys on, and no way out of the machine (any request elsewhere is refused and recorded)."""

from __future__ import annotations

import base64

import httpx
import pytest

from tests.browser import offline_page
from tests.conftest import image_bytes
from tests.live_server import live_server

KEY = "playground-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
RESULT_TIMEOUT_MS = 180_000  # the tiny model on a busy 2-CPU machine


@pytest.fixture(scope="module")
def server():
    with live_server(FLUX_API_KEYS=KEY, FLUX_WARMUP="false") as (base, _):
        yield base


@pytest.fixture
def page(browser, server):
    with offline_page(browser, server) as (page, refused, errors):
        page.goto(f"{server}/")
        yield page
        assert refused == [], f"the page asked for something not on this server: {refused}"
        assert errors == [], f"script errors in the page: {errors}"


def fill_request(page, prompt: str, width: int, height: int, steps: int = 2, seed: int | None = None) -> None:
    page.fill("#prompt", prompt)
    page.select_option("#size", "custom")
    page.fill("#width", str(width))
    page.fill("#height", str(height))
    page.fill("#steps", str(steps))
    if seed is not None:
        page.fill("#seed", str(seed))


def enter_key(page) -> None:
    page.click("#key-box summary")
    page.fill("#api-key", KEY)


def result_size(page) -> tuple[int, int]:
    page.wait_for_selector("#images img", timeout=RESULT_TIMEOUT_MS)
    page.wait_for_function("() => document.querySelector('#images img').complete")
    return tuple(
        page.evaluate(
            "() => { const i = document.querySelector('#images img'); return [i.naturalWidth, i.naturalHeight] }"
        )
    )


def shown_error(page) -> str:
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    return page.inner_text("#error")


def test_page_is_served_with_its_own_files_only(server):
    response = httpx.get(f"{server}/")  # no key: the page itself is open
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    for asset in ("playground/playground.js", "playground/playground.css"):
        assert asset in response.text
        assert httpx.get(f"{server}/{asset}").status_code == 200


def test_edit_round_trip_with_progress_timings_and_optimizations(page, server):
    assert "Ready" in page.inner_text("#server")
    page.set_input_files("#image", {"name": "input.png", "mimeType": "image/png", "buffer": image_bytes(96, 64)})
    fill_request(page, "make it a winter scene", 320, 256, steps=2, seed=7)

    page.click("#generate")  # no key yet: the server's 401, shown in the page
    assert "API key is required" in shown_error(page)
    assert page.locator("#images img").count() == 0

    enter_key(page)
    page.click("#generate")
    assert result_size(page) == (320, 256)
    assert page.locator("#error").is_hidden()
    events = page.inner_text("#events")
    assert "step 1 of 2" in events and "step 2 of 2" in events  # live progress from the event stream

    job_id = page.inner_text("[data-field=job]")
    job = httpx.get(f"{server}/v1/jobs/{job_id}", headers=AUTH).json()
    result = job["result"]
    assert job["status"] == "succeeded" and result["mode"] == "edit"
    assert result["images"][0]["seed"] == 7 and (result["images"][0]["width"], result["images"][0]["height"]) == (
        320,
        256,
    )
    assert page.locator("#ran li").all_inner_texts() == result["optimizations"]["ran"]
    stages = page.locator("#timings td:first-child").all_inner_texts()
    assert [stage.replace("_", " ") for stage in result["timings_ms"]] == stages
    assert "seed 7" in page.inner_text("#images figcaption")

    page.reload()  # the key stays in this browser
    assert page.input_value("#api-key") == KEY


def test_text_to_image_without_an_image(page):
    enter_key(page)
    fill_request(page, "a lighthouse at dawn", 256, 256, steps=1)
    page.click("#generate")
    assert result_size(page) == (256, 256)
    assert page.inner_text("[data-field=mode]") == "text-to-image"


def test_a_bad_file_shows_the_servers_error(page, server):
    enter_key(page)
    not_an_image = b"this is not a PNG at all"
    page.set_input_files("#image", {"name": "broken.png", "mimeType": "image/png", "buffer": not_an_image})
    fill_request(page, "make it a winter scene", 256, 256, steps=1)
    page.click("#generate")
    message = shown_error(page)
    expected = httpx.post(
        f"{server}/v1/jobs",
        headers=AUTH,
        files={"image": ("broken.png", not_an_image, "image/png")},
        data={"prompt": "make it a winter scene"},
    )
    assert 400 <= expected.status_code < 500
    assert str(expected.status_code) in message and expected.json()["error"]["message"] in message
    assert page.locator("#images img").count() == 0
    assert page.locator("#generate").is_enabled()  # ready for the next try


def test_a_file_that_is_not_an_image_is_refused_in_the_page(page):
    page.set_input_files("#image", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"})
    message = shown_error(page)
    assert "notes.txt" in message and "PNG, JPEG or WebP" in message
    assert page.locator("#preview").is_hidden()


def test_dropping_an_image_selects_it(page):
    png = base64.b64encode(image_bytes(96, 64)).decode()
    page.evaluate(
        """(png) => {
            const bytes = Uint8Array.from(atob(png), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            const drop = document.getElementById("drop");
            drop.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        }""",
        png,
    )
    page.wait_for_function("() => document.getElementById('preview').naturalWidth > 0")
    assert page.inner_text("#image-info").startswith("dropped.png · 96×64")
    page.click("#clear-image")
    assert page.locator("#preview").is_hidden() and page.inner_text("#image-info") == ""
