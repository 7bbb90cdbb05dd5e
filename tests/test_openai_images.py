"""The OpenAI-compatible endpoints with the official ``openai`` SDK as the client, against a real uvicorn process."""

from __future__ import annotations

import base64
import io
import time

import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from flux_kontext.service import create_app
from flux_kontext.settings import Settings
from tests.conftest import image_bytes
from tests.live_server import live_server

FAST = {"steps": 1, "seed": 21}


@pytest.fixture(scope="module")
def base_url():
    """uvicorn flux_kontext_optimized:app with the tiny model (no warm-up: these tests are about the protocol)."""
    with live_server(FLUX_WARMUP="false") as (base, _):
        yield base


@pytest.fixture(scope="module")
def sdk(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-checked", max_retries=0, timeout=120)


def picture(item) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
    img.load()
    return img


def png_file(width: int, height: int, name: str = "in.png"):
    return (name, image_bytes(width, height), "image/png")


def test_generate_returns_the_promised_size_with_our_report(sdk):
    result = sdk.images.generate(prompt="a red fox", size="512x512", extra_body=FAST)
    assert len(result.data) == 1 and result.created > 0
    assert picture(result.data[0]).size == (512, 512)
    assert result.size == "512x512" and result.output_format == "png"
    assert result.seeds == [21] and result.steps == 1 and result.scheduler == "unipc"
    assert result.timings_ms["total"] > 0 and "ran" in result.optimizations


def test_n_images_use_seed_and_seed_plus_one(sdk):
    result = sdk.images.generate(prompt="a boat", n=2, size="256x256", extra_body={"steps": 1, "seed": 40})
    assert result.seeds == [40, 41]
    assert len({item.b64_json for item in result.data}) == 2
    assert all(picture(item).size == (256, 256) for item in result.data)


def test_extras_reach_the_engine_and_the_same_seed_gives_the_same_bytes(sdk):
    extras = {"steps": 3, "seed": 77, "scheduler": "euler", "guidance_scale": 2.0}
    first = sdk.images.generate(prompt="a lighthouse", size="256x256", extra_body=extras)
    again = sdk.images.generate(prompt="a lighthouse", size="256x256", extra_body=extras)
    other = sdk.images.generate(prompt="a lighthouse", size="256x256", extra_body={**extras, "seed": 78})
    assert first.steps == 3 and first.scheduler == "euler" and first.guidance_scale == 2.0
    assert first.data[0].b64_json == again.data[0].b64_json
    assert other.data[0].b64_json != first.data[0].b64_json


def test_jpeg_with_output_compression(sdk):
    result = sdk.images.generate(
        prompt="a hill", size="256x256", output_format="jpeg", output_compression=40, extra_body=FAST
    )
    assert base64.b64decode(result.data[0].b64_json).startswith(b"\xff\xd8")
    assert result.output_format == "jpeg"


def test_edit_with_auto_size_follows_the_input_aspect_ratio(sdk):
    result = sdk.images.edit(image=png_file(300, 200), prompt="make it night", size="auto", extra_body=FAST)
    assert picture(result.data[0]).size == (1248, 832)  # 3:2 snapped to the nearest Kontext resolution
    assert result.size_source == "input_aspect_snapped" and result.seeds == [21]


def test_edit_at_a_requested_size_with_form_extras(sdk):
    extras = {"steps": 2, "seed": 5, "use_dpm_solver": False}
    result = sdk.images.edit(image=[png_file(64, 64)], prompt="add a hat", size="256x256", n=2, extra_body=extras)
    assert [picture(item).size for item in result.data] == [(256, 256), (256, 256)]
    assert result.seeds == [5, 6] and result.steps == 2 and result.scheduler == "euler"


def test_an_edit_with_two_images_is_refused_naming_the_limit(sdk):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.images.edit(image=[png_file(64, 64, "a.png"), png_file(64, 64, "b.png")], prompt="merge", extra_body=FAST)
    assert refused.value.param == "image"
    assert "one context image" in refused.value.message


@pytest.mark.parametrize(
    ("option", "value"),
    [("response_format", "url"), ("quality", "high"), ("background", "transparent"), ("style", "vivid")],
)
def test_unsupported_generation_options_are_a_400_naming_them(sdk, option, value):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.images.generate(prompt="a cat", size="256x256", extra_body=FAST, **{option: value})
    assert refused.value.param == option
    assert f"{option}=" in refused.value.message and "not supported" in refused.value.message


def test_a_mask_is_refused_not_ignored(sdk):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.images.edit(image=png_file(64, 64), mask=png_file(64, 64, "mask.png"), prompt="x", extra_body=FAST)
    assert refused.value.param == "mask" and "inpainting" in refused.value.message


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"size": "1000x1000"}, "size", "multiples of 16"),
        ({"n": 9}, "n", "less than or equal to 4"),
        ({"output_compression": 50}, "output_compression", "jpeg and webp only"),
        ({"extra_body": {"steps": 0}}, "steps", "steps"),
        ({"extra_body": {"colour": "red"}}, "colour", "unknown parameter 'colour'"),
    ],
)
def test_invalid_values_are_a_400_naming_the_parameter(sdk, fields, param, words):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.images.generate(prompt="a cat", **fields)
    assert refused.value.param == param
    assert words in refused.value.message


def test_user_metadata_is_accepted(sdk):
    result = sdk.images.generate(prompt="a cat", size="256x256", user="someone", extra_body=FAST)
    assert result.seeds == [21]


def test_models_lists_the_loaded_model_and_requests_may_name_it(sdk):
    models = sdk.models.list().data
    assert [model.id for model in models] == ["tiny"]
    assert models[0].object == "model" and sdk.models.retrieve("tiny").id == "tiny"
    result = sdk.images.generate(prompt="a cat", model="tiny", size="256x256", extra_body=FAST)
    assert len(result.data) == 1
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.images.generate(prompt="a cat", model="gpt-image-1", size="256x256")
    assert "'tiny'" in missing.value.message


def test_not_ready_is_a_503_in_openai_shape_with_retry_after():
    with TestClient(create_app(Settings(model="/no/such/folder/flux", warmup=False))) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").json()["state"] != "failed" and time.monotonic() < deadline:
            time.sleep(0.1)
        response = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "256x256"})
    assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error" and error["code"] == "not_ready" and error["message"]
