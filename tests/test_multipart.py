"""/inference with multipart/form-data, aspect_ratio and output_quality, through the ASGI app on the tiny model."""

from __future__ import annotations

import base64

import pytest

from tests.conftest import decode_b64_image, image_b64, image_bytes

FAST = {"prompt": "make it blue", "steps": "1", "seed": "3"}


def png_part(data: bytes | None = None, name: str = "image", filename: str = "in.png"):
    return (name, (filename, image_bytes(96, 64) if data is None else data, "image/png"))


def post_form(client, files=(), **fields):
    return client.post("/inference", data={**FAST, **fields}, files=list(files))


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_an_image_file_part_edits_like_the_same_request_in_json(client):
    form = post_form(client, [png_part()], width="256", height="256")
    assert form.status_code == 200, form.text
    body = form.json()
    assert body["mode"] == "edit" and body["steps"] == 1 and body["images"][0]["seed"] == 3
    as_json = {"prompt": "make it blue", "steps": 1, "seed": 3, "width": 256, "height": 256}
    as_json["image"] = base64.b64encode(image_bytes(96, 64)).decode()
    same = client.post("/inference", json=as_json).json()
    assert body["images"][0]["image"] == same["images"][0]["image"]  # same validation, defaults and engine path
    assert body["scheduler"] == same["scheduler"] == "unipc"


def test_text_to_image_from_form_fields_only(client):
    response = post_form(client, width="256", height="256", guidance_scale="2.5", use_dpm_solver="false")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mode"] == "text_to_image" and body["scheduler"] == "euler" and body["guidance_scale"] == 2.5
    assert decode_b64_image(body["images"][0]["image"]).size == (256, 256)


@pytest.mark.parametrize(("ratio", "expected"), [("16:9", (1392, 752)), ("9:21", (672, 1568))])
def test_aspect_ratio_snaps_to_the_nearest_kontext_resolution(client, ratio, expected):
    response = post_form(client, aspect_ratio=ratio)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size_source"] == "aspect_ratio_snapped"
    assert decode_b64_image(body["images"][0]["image"]).size == expected


def test_aspect_ratio_match_input_image_follows_the_input_in_json_too(client):
    body = {"prompt": "night", "image": image_b64(300, 200), "aspect_ratio": "match_input_image", "steps": 1}
    response = client.post("/inference", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["size_source"] == "input_aspect_snapped"
    assert decode_b64_image(response.json()["images"][0]["image"]).size == (1248, 832)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"aspect_ratio": "16:9", "width": "256", "height": "256"}, "aspect_ratio or width/height, not both"),
        ({"aspect_ratio": "16x9"}, "'W:H'"),
        ({"aspect_ratio": "5:1"}, "outside 9:21 to 21:9"),
        ({"aspect_ratio": "match_input_image"}, "needs an input image"),
        ({"output_quality": "80"}, "output_quality applies to jpeg and webp only"),
        ({"output_quality": "0", "output_format": "jpeg"}, "output_quality"),
        ({"output_quality": "101", "output_format": "webp"}, "output_quality"),
        ({"steps": "many"}, "steps"),
        ({"colour": "red"}, "unknown field 'colour'"),
    ],
)
def test_bad_form_fields_get_422_naming_the_field(client, fields, words):
    error = error_of(post_form(client, **fields), 422)
    assert error["type"] == "invalid_request"
    assert words in error["message"]


def test_output_quality_reaches_the_encoder(client):
    sizes = {}
    for quality in ("10", "95"):
        response = post_form(client, width="256", height="256", output_format="jpeg", output_quality=quality)
        data = base64.b64decode(response.json()["images"][0]["image"])
        assert data.startswith(b"\xff\xd8")
        sizes[quality] = len(data)
    assert sizes["10"] < sizes["95"]
    default = post_form(client, width="256", height="256", output_format="jpeg").json()["images"][0]["image"]
    assert len(base64.b64decode(default)) == sizes["95"]  # 95 stays the default


BOUNDARY = "testboundary"


def multipart_body(*parts: tuple[str, bytes, str | None], close: bool = True) -> bytes:
    chunks = []
    for name, data, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        chunks.append(f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(chunks) + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def post_raw(client, body: bytes, content_type: str = f"multipart/form-data; boundary={BOUNDARY}"):
    return client.post("/inference", content=body, headers={"content-type": content_type})


MALFORMED = [
    ("missing boundary", lambda c: post_raw(c, multipart_body(("prompt", b"x", None)), "multipart/form-data"), 400),
    ("truncated", lambda c: post_raw(c, multipart_body(("prompt", b"x", None), ("steps", b"1", None))[:-30]), 400),
    ("non-image file", lambda c: post_form(c, [png_part(b"just some text")]), 400),
    ("0-byte image", lambda c: post_form(c, [png_part(b"")]), 400),
    ("two file parts", lambda c: post_form(c, [png_part(), png_part(filename="b.png")]), 422),
    ("file part and base64 field", lambda c: post_form(c, [png_part()], image=image_b64(64, 64)), 422),
    ("prompt as a file", lambda c: post_raw(c, multipart_body(("prompt", b"x", "p.txt"))), 422),
    ("a field twice", lambda c: post_raw(c, multipart_body(("prompt", b"x", None), ("prompt", b"y", None))), 400),
    ("not a form", lambda c: post_raw(c, b"prompt=x", "text/plain"), 415),
    ("JSON labelled a form", lambda c: post_raw(c, b'{"prompt": "x"}', "application/x-www-form-urlencoded"), 415),
]
WORDS = {
    "missing boundary": "boundary",
    "truncated": "truncated",
    "non-image file": "'image' is not a readable image",
    "0-byte image": "'image' is empty",
    "two file parts": "send one 'image'",
    "file part and base64 field": "send one 'image'",
    "prompt as a file": "field 'prompt' is a file part",
    "a field twice": "field 'prompt' is given more than once",
    "not a form": "multipart/form-data",
    "JSON labelled a form": "Content-Type: application/json",
}


@pytest.mark.parametrize(("case", "send", "status"), MALFORMED, ids=[case for case, *_ in MALFORMED])
def test_malformed_multipart_gets_a_clear_4xx_in_the_envelope(client, case, send, status):
    error = error_of(send(client), status)
    assert set(error) <= {"type", "message", "details", "request_id"}
    assert WORDS[case] in error["message"]


def test_service_stays_ready_after_malformed_bodies(client):
    for _, send, _ in MALFORMED:
        send(client)
    assert client.get("/health/ready").status_code == 200
    response = post_form(client, [png_part()], width="256", height="256")
    assert response.status_code == 200, response.text
