"""/inference answers the image itself when the client accepts an image type (curl -o out.png)."""

from __future__ import annotations

import base64
import io

from PIL import Image

SMALL = {"prompt": "a lighthouse", "width": 256, "height": 256, "steps": 1, "seed": 5}


def test_accept_image_png_returns_the_png_bytes_with_the_seed_in_a_header(client):
    response = client.post("/inference", json=SMALL, headers={"Accept": "image/png"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "5" and response.headers["x-image-size"] == "256x256"
    assert "dpm_solver" in response.headers["x-optimizations-ran"].split(",")
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.size == (256, 256)
    as_json = client.post("/inference", json=SMALL).json()["images"][0]["image"]
    assert base64.b64decode(as_json) == response.content  # the same image as the JSON answer carries


def test_accept_picks_the_format_and_json_stays_the_default(client):
    webp = client.post("/inference", json=SMALL, headers={"Accept": "image/webp, application/json;q=0.5"})
    assert webp.headers["content-type"] == "image/webp" and Image.open(io.BytesIO(webp.content)).format == "WEBP"
    for accept in ("application/json", "*/*", "", "application/json, image/png"):
        response = client.post("/inference", json=SMALL, headers={"Accept": accept} if accept else {})
        assert response.headers["content-type"] == "application/json", accept


def test_accept_image_refuses_what_one_image_cannot_answer(client):
    several = client.post("/inference", json={**SMALL, "num_images": 2}, headers={"Accept": "image/png"})
    assert several.status_code == 406 and "num_images 1" in several.json()["error"]["message"]
    conflict = client.post("/inference", json={**SMALL, "output_format": "jpeg"}, headers={"Accept": "image/png"})
    assert conflict.status_code == 406 and "output_format is jpeg" in conflict.json()["error"]["message"]
    bad = client.post("/inference", json={**SMALL, "steps": 0}, headers={"Accept": "image/png"})
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/json"  # errors stay JSON
