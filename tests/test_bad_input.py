"""Bad input gets a clear 4xx in the one error envelope, and the service keeps serving."""

from __future__ import annotations

import base64
import struct
import zlib

import pytest

from tests.conftest import image_b64, image_bytes, make_client, wait_ready


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid PNG header that claims a huge size, with almost no data: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GOOD = {"prompt": "make it blue", "width": 256, "height": 256, "steps": 1}

IMAGE_CASES = [
    ("not base64 at all!!", 400, "invalid_base64", "not valid base64"),
    (b64(b"hello, this is text and not an image"), 400, "invalid_image", "not a readable image"),
    (b64(image_bytes(64, 64)[:120]), 400, "invalid_image", "truncated or corrupt"),
    (b64(png_claiming_size(100_000, 100_000)), 413, "image_too_large", "FLUX_MAX_INPUT_PIXELS"),
    (b64(image_bytes(32, 32, "GIF")), 415, "unsupported_image_format", "PNG, JPEG or WebP"),
    ("data:image/png,rawbytes", 400, "invalid_image", "base64"),
    ("", 400, "invalid_image", "empty"),
]


@pytest.mark.parametrize(("image", "status", "kind", "words"), IMAGE_CASES)
def test_bad_images(client, image, status, kind, words):
    response = client.post("/inference", json={**GOOD, "image": image})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind
    assert words in error["message"]


FIELD_CASES = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt must not be empty"),
    ({"prompt": None}, "prompt"),
    ({"width": 1000}, "multiple of 16"),
    ({"width": 4096}, "width"),
    ({"width": 128}, "width"),
    ({"height": None, "width": 512}, "both width and height"),
    ({"steps": 0}, "steps"),
    ({"steps": 51}, "steps"),
    ({"guidance_scale": 25}, "guidance_scale"),
    ({"true_cfg_scale": -1}, "true_cfg_scale"),
    ({"num_images": 5}, "num_images"),
    ({"seed": -1}, "seed"),
    ({"output_format": "bmp"}, "output_format"),
    ({"use_mxfp4": "perhaps"}, "use_mxfp4"),
    ({"use_cuda_graphs": 0}, "must be true or false, not a number"),
    ({"seed": True}, "must be an integer, not true or false"),
    ({"colour": "red"}, "unknown field 'colour'"),
    ({"scheduler": "ddim"}, "valid: euler, dpmpp_2m, dpmpp_2m_karras, unipc"),
    ({"scheduler": "dpmpp_2m", "use_dpm_solver": False}, "use_dpm_solver is false"),
]


@pytest.mark.parametrize(("change", "words"), FIELD_CASES)
def test_bad_fields_get_422_naming_the_field(client, change, words):
    body = {key: value for key, value in {**GOOD, **change}.items() if value is not None}  # None: leave it out
    response = client.post("/inference", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert words in error["message"]


def test_missing_prompt_says_it_is_required(client):
    response = client.post("/inference", json={"width": 256, "height": 256})
    assert response.status_code == 422
    assert "field 'prompt' is required" in response.json()["error"]["message"]


def test_malformed_json(client):
    response = client.post("/inference", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "not valid JSON" in response.json()["error"]["message"]


def test_unknown_route_and_method_use_the_envelope(client):
    assert client.get("/nope").json()["error"]["type"] == "not_found"
    response = client.get("/inference")
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "method_not_allowed"


def test_oversize_body_gets_413_and_the_service_keeps_serving():
    with make_client(max_body_mb=0.05) as small:
        wait_ready(small)
        big = {**GOOD, "image": image_b64(64, 64) + "A" * 80_000}
        response = small.post("/inference", json=big)
        assert response.status_code == 413
        assert "FLUX_MAX_BODY_MB" in response.json()["error"]["message"]
        assert small.post("/inference", json=GOOD).status_code == 200


def test_service_still_serves_after_bad_inputs(client):
    for image, *_ in IMAGE_CASES:
        client.post("/inference", json={**GOOD, "image": image})
    response = client.post("/inference", json={**GOOD, "image": image_b64(80, 60)})
    assert response.status_code == 200
    assert response.json()["images"][0]["width"] == 256
