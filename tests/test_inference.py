"""Generation through the ASGI app on the tiny model: sizes, determinism, reporting."""

from __future__ import annotations

import base64

import pytest

from flux_kontext.resolution import PREFERRED_KONTEXT_RESOLUTIONS, kontext_resolution
from flux_kontext.schedulers import SCHEDULERS
from tests.conftest import decode_b64_image, image_b64

SEED_CURL_BODY = {
    "prompt": "A majestic mountain landscape at sunset",
    "width": 1024,
    "height": 1024,
    "steps": 14,
    "num_images": 1,
    "use_flash_attention": True,
    "use_mxfp4": True,
    "use_dpm_solver": True,
    "use_cuda_graphs": True,
}


def post(client, **body):
    return client.post("/inference", json={"steps": 2, **body})


@pytest.mark.parametrize(
    ("size", "expected"),
    [((300, 200), (1248, 832)), ((200, 400), (720, 1456)), ((512, 512), (1024, 1024))],
)
def test_edit_output_follows_input_aspect_snapped_to_kontext_resolution(client, size, expected):
    response = post(client, prompt="make it blue", image=image_b64(*size), seed=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mode"] == "edit"
    assert body["size_source"] == "input_aspect_snapped"
    assert body["context_size"] == list(expected)
    image = body["images"][0]
    assert (image["width"], image["height"]) == expected
    assert decode_b64_image(image["image"]).size == expected


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_edit_accepts_jpeg_and_webp_and_data_uri(client, fmt):
    data_uri = f"data:image/{fmt.lower()};base64," + image_b64(64, 64, fmt)
    response = post(client, prompt="add a hat", image=data_uri, width=256, height=256, seed=1)
    assert response.status_code == 200, response.text
    assert decode_b64_image(response.json()["images"][0]["image"]).size == (256, 256)


def test_explicit_size_overrides_the_snapped_one(client):
    response = post(client, prompt="add a hat", image=image_b64(300, 200), width=512, height=256, seed=1)
    body = response.json()
    assert body["size_source"] == "request"
    assert (body["images"][0]["width"], body["images"][0]["height"]) == (512, 256)
    assert body["context_size"] == [1248, 832]  # the input keeps its own snapped size


def test_seed_curl_example_works_verbatim_and_reports_what_did_not_run(client):
    response = client.post("/inference", json=SEED_CURL_BODY)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mode"] == "text_to_image"
    assert body["steps"] == 14
    assert decode_b64_image(body["images"][0]["image"]).size == (1024, 1024)
    assert isinstance(body["images"][0]["seed"], int)
    assert body["scheduler"] == "unipc"
    not_applied = {entry["flag"]: entry["reason"] for entry in body["optimizations"]["not_applied"]}
    # None of the GPU stack is loaded on a CPU: each requested flag must say why it did not run.
    assert set(not_applied) == {"use_flash_attention", "use_mxfp4", "use_cuda_graphs"}
    assert all(reason for reason in not_applied.values())
    assert {"attention", "dpm_solver"} <= set(body["optimizations"]["ran"])
    assert body["model"]["kind"] == "tiny" and body["model"]["demo"] is True


def test_text_to_image_default_size_is_1024(client):
    body = post(client, prompt="a red fox", seed=11, steps=1).json()
    assert body["size_source"] == "default"
    assert (body["images"][0]["width"], body["images"][0]["height"]) == (1024, 1024)


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(client):
    request = {"prompt": "a lighthouse", "image": image_b64(96, 64), "width": 256, "height": 256, "seed": 1234}
    first = post(client, **request).json()["images"][0]
    second = post(client, **request).json()["images"][0]
    other = post(client, **{**request, "seed": 1235}).json()["images"][0]
    assert first["seed"] == second["seed"] == 1234
    assert first["image"] == second["image"]
    assert other["image"] != first["image"]


def test_prompt_changes_the_image(client):
    request = {"width": 256, "height": 256, "seed": 7}
    a = post(client, prompt="a cat", **request).json()["images"][0]["image"]
    b = post(client, prompt="a dog", **request).json()["images"][0]["image"]
    assert a != b


def test_num_images_returns_one_seed_per_image(client):
    body = post(client, prompt="a boat", width=256, height=256, seed=40, num_images=3).json()
    assert [img["seed"] for img in body["images"]] == [40, 41, 42]
    assert len({img["image"] for img in body["images"]}) == 3


def test_random_seed_is_returned_and_reproduces(client):
    body = post(client, prompt="a tree", width=256, height=256).json()
    seed = body["images"][0]["seed"]
    again = post(client, prompt="a tree", width=256, height=256, seed=seed).json()
    assert again["images"][0]["image"] == body["images"][0]["image"]


@pytest.mark.parametrize(("fmt", "magic"), [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_output_format(client, fmt, magic):
    body = post(client, prompt="a hill", width=256, height=256, seed=2, output_format=fmt).json()
    assert body["images"][0]["format"] == fmt
    assert base64.b64decode(body["images"][0]["image"]).startswith(magic)


def test_true_cfg_runs_only_with_a_negative_prompt(client):
    base = {"prompt": "a house", "width": 256, "height": 256, "seed": 5, "true_cfg_scale": 4.0}
    without = post(client, **base).json()
    with_negative = post(client, **base, negative_prompt="blurry").json()
    assert without["true_cfg_active"] is False
    assert with_negative["true_cfg_active"] is True
    assert with_negative["images"][0]["image"] != without["images"][0]["image"]


def test_response_reports_phase_timings_steps_and_scheduler(client):
    body = post(client, prompt="a bridge", image=image_b64(64, 64), width=256, height=256, steps=3).json()
    timings = body["timings_ms"]
    for phase in ("queue_wait", "text_encoding", "image_encoding", "denoising", "decoding", "total"):
        assert timings[phase] >= 0, phase
    assert timings["image_encoding"] > 0 and timings["denoising"] > 0 and timings["decoding"] > 0
    assert timings["total"] >= timings["engine_total"]
    assert body["steps"] == 3
    assert body["scheduler"]


def test_kontext_resolution_matches_every_preferred_size():
    for width, height in PREFERRED_KONTEXT_RESOLUTIONS:
        assert kontext_resolution(width, height) == (width, height)
        assert kontext_resolution(width * 3, height * 3) == (width, height)
    assert kontext_resolution(4000, 100) == (1568, 672)
    assert kontext_resolution(100, 4000) == (672, 1568)
    with pytest.raises(ValueError):
        kontext_resolution(0, 10)


@pytest.mark.parametrize(
    ("fields", "scheduler", "steps", "dpm_ran"),
    [
        ({}, "unipc", 14, True),
        ({"scheduler": "dpmpp_2m"}, "dpmpp_2m", 14, True),
        ({"use_dpm_solver": False}, "euler", 28, False),
        ({"scheduler": "euler"}, "euler", 28, False),
        ({"scheduler": "dpmpp_2m_karras"}, "dpmpp_2m_karras", 14, True),
        ({"scheduler": "dpmpp_2m", "steps": 3}, "dpmpp_2m", 3, True),
    ],
)
def test_scheduler_choice_and_default_steps_are_reported(client, fields, scheduler, steps, dpm_ran):
    body = {"prompt": "a hill", "width": 256, "height": 256, "seed": 4, **fields}
    response = client.post("/inference", json=body).json()
    assert response["scheduler"] == scheduler
    assert response["steps"] == steps
    assert ("dpm_solver" in response["optimizations"]["ran"]) is dpm_ran
    if not dpm_ran and fields.get("use_dpm_solver", True):
        reasons = {e["flag"]: e["reason"] for e in response["optimizations"]["not_applied"]}
        assert "euler" in reasons["use_dpm_solver"]


def test_each_scheduler_is_deterministic_and_they_differ(client):
    images = {}
    for name in SCHEDULERS:
        body = {"prompt": "a hill", "width": 256, "height": 256, "seed": 4, "steps": 4, "scheduler": name}
        first = client.post("/inference", json=body).json()["images"][0]["image"]
        assert client.post("/inference", json=body).json()["images"][0]["image"] == first
        images[name] = first
    assert len(set(images.values())) == len(SCHEDULERS)


def test_a_prompt_longer_than_t5_reads_is_reported_and_not_logged(client):
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_log = logging.getLogger("diffusers.pipelines.flux.pipeline_flux_kontext")  # does not propagate
    diffusers_log.addHandler(handler)
    try:
        long_prompt = "a very long prompt " * 10  # 190 bytes: the tiny model's T5 reads 64 tokens (one per byte)
        body = post(client, prompt=long_prompt, width=256, height=256, seed=1, steps=1).json()
    finally:
        diffusers_log.removeHandler(handler)
    assert body["warnings"] == ["prompt is 191 T5 tokens; only the first 64 are used"]
    assert post(client, prompt="short", width=256, height=256, seed=1, steps=1).json()["warnings"] == []
    assert not [r for r in records if "very long prompt" in r.getMessage()]  # the user's text is not logged


def test_the_response_times_its_image_encoding_and_png_stays_lossless(client):
    import base64
    import io

    import numpy as np
    from PIL import Image

    from flux_kontext.image_encoding import ImageEncoder

    body = client.post("/inference", json={"prompt": "a fox", "width": 256, "height": 256, "steps": 1}).json()
    assert body["timings_ms"]["encoding"] >= 0 and body["timings_ms"]["total"] >= body["timings_ms"]["encoding"]
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    data, encoder = ImageEncoder(png="pillow").encode_base64(Image.fromarray(pixels), "png")  # FLUX_PNG_ENCODER=pillow
    decoded = Image.open(io.BytesIO(base64.b64decode(data)))
    assert encoder == "pillow"
    assert decoded.format == "PNG" and np.array_equal(np.asarray(decoded), pixels)
