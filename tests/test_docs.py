"""/docs and /redoc from the package's own files (fastapi-offline), and an OpenAPI document whose examples are valid
requests: the JSON examples and the forms Swagger UI fills in from the fields' examples answer 200 on the tiny
model, through the API and through Swagger UI itself in a headless browser that can reach nothing else."""

from __future__ import annotations

import re

import pytest

from flux_kontext.schedulers import SCHEDULERS
from flux_kontext.schemas import InferenceRequest
from tests.browser import offline_page
from tests.conftest import image_bytes, make_client
from tests.live_server import live_server

ASSET = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|\burl:\s*'([^']+)'""")
BROWSER_TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def openapi(client):
    return client.get("/openapi.json").json()


def request_body(openapi: dict, path: str, kind: str) -> dict:
    return openapi["paths"][path]["post"]["requestBody"]["content"][kind]


def form_sample(schema: dict) -> dict[str, str]:
    """The form Swagger UI fills in: each field's first example, else its default (empty fields are not sent)."""
    sample = {}
    for name, field in schema["properties"].items():
        value = field["examples"][0] if "examples" in field else field.get("default")
        if field.get("format") == "binary" or value in (None, "", []):
            continue
        sample[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return sample


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets(client, page):
    response = client.get(page)
    assert response.status_code == 200
    urls = [next(group for group in match if group) for match in ASSET.findall(response.text)]
    assert "/openapi.json" in urls and any(url.endswith(".js") for url in urls)
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from elsewhere"
        assert client.get(url).status_code == 200, url


def test_scheduler_is_an_enum_and_examples_fit_their_limits(openapi):
    fields = request_body(openapi, "/inference", "application/json")["schema"]["properties"]
    choices = [choice for choice in fields["scheduler"]["anyOf"] if "enum" in choice]
    assert choices and choices[0]["enum"] == list(SCHEDULERS)
    seed = next(choice for choice in fields["seed"]["anyOf"] if choice.get("type") == "integer")
    assert 0 <= fields["seed"]["examples"][0] <= min(seed["maximum"], 2**53)  # 2**53: exact in a browser's numbers


@pytest.mark.parametrize("path", ["/inference", "/v1/jobs"])
def test_json_examples_are_valid_requests(openapi, path):
    example = request_body(openapi, path, "application/json")["example"]
    assert InferenceRequest.model_validate(example)


def test_inference_json_example_answers_200(client, openapi):
    example = request_body(openapi, "/inference", "application/json")["example"]
    response = client.post("/inference", json=example)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/inference", "/v1/jobs"])
def test_form_samples_are_valid_requests(openapi, path):
    """What Swagger UI fills in: text fields, validated as the server validates a form (the browser test below
    sends it for real)."""
    form = form_sample(request_body(openapi, path, "multipart/form-data")["schema"])
    assert form["scheduler"] in SCHEDULERS and form["seed"] == "42"
    assert InferenceRequest.model_validate(form)


def test_openai_edit_form_sample_answers_200(client, openapi):
    form = form_sample(request_body(openapi, "/v1/images/edits", "multipart/form-data")["schema"])
    files = {"image": ("in.png", image_bytes(64, 48), "image/png")}
    response = client.post("/v1/images/edits", data={**form, "steps": "1"}, files=files)  # 1 step: time only
    assert response.status_code == 200, response.text


def test_empty_form_fields_count_as_absent(client):
    """Browsers (and Swagger UI) send every input of a form; an empty one is a field not given."""
    fields = {"prompt": "a lighthouse", "width": "256", "height": "256", "steps": "1", "seed": "", "scheduler": ""}
    response = client.post("/inference", data={**fields, "negative_prompt": "", "output_quality": ""})
    assert response.status_code == 200, response.text
    assert response.json()["steps"] == 1


def test_health_routes_declare_their_503(openapi):
    for path in ("/health", "/health/ready"):
        responses = openapi["paths"][path]["get"]["responses"]
        assert "503" in responses, path
        assert responses["503"]["content"]["application/json"]["example"]


# ----- in a browser -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    with live_server(FLUX_WARMUP="false", FLUX_DRAIN_TIMEOUT_S="0") as (base, _):  # an async job need not finish
        yield base


@pytest.mark.parametrize(
    "operation, status",
    [("inference_inference_post", "200"), ("async_jobs-submit_job_v1_jobs_post", "202")],
    ids=["/inference", "/v1/jobs"],
)
def test_swagger_ui_renders_offline_and_its_filled_in_form_is_a_valid_request(browser, server, operation, status):
    """Swagger UI's "Try it out" with the form as it fills it in (every field from the examples, the file input
    left empty), sent as it is."""
    block = f"#operations-{operation if '-' in operation else 'default-' + operation}"
    with offline_page(browser, server) as (page, refused, errors):
        page.goto(f"{server}/docs")
        page.wait_for_selector(block, timeout=30_000)
        page.click(f"{block} .opblock-summary")
        page.click(f"{block} button.try-out__btn")
        page.select_option(f"{block} .opblock-section-request-body select", "multipart/form-data")
        assert page.input_value(f"{block} [data-property-name=seed] input") == "42"
        assert page.input_value(f"{block} [data-property-name=scheduler] select") in SCHEDULERS
        page.click(f"{block} button.execute")
        answer = page.wait_for_selector(
            f"{block} .live-responses-table tbody .response-col_status", timeout=BROWSER_TIMEOUT_MS
        )
        assert answer.inner_text().strip() == status, page.inner_text(f"{block} .live-responses-table tbody")
        assert refused == [] and errors == []


def test_redoc_renders_offline(browser, server):
    with offline_page(browser, server) as (page, refused, errors):
        page.goto(f"{server}/redoc")
        page.wait_for_selector("text=/inference", timeout=30_000)
        assert refused == [] and errors == []


def test_docs_assets_follow_the_docs_pages_key_policy():
    asset = "/docs/assets/swagger-ui-bundle.js"
    # Without the lifespan (no `with`): no model loads, the pages and the key check need none.
    client = make_client(api_keys=["docs-test-key-0123456789"])
    assert client.get("/docs").status_code == 200 and client.get(asset).status_code == 200
    client = make_client(api_keys=["docs-test-key-0123456789"], auth_protect_info=True)
    assert client.get("/docs").status_code == 401 and client.get(asset).status_code == 401
