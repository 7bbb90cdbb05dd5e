"""LoRA adapters per request (flux_kontext/optimizations/lora.py) on the tiny model: adapters made here with peft
(diffusers/peft keys) and in kohya's keys, against diffusers' own load_lora_weights + set_adapters on the same tiny
pipeline; switching between requests; the HTTP contract (422s, what responses and /health report)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from flux_kontext.engine import Engine
from flux_kontext.jobs import Job
from flux_kontext.service import create_app
from flux_kontext.settings import Settings
from tests.conftest import decode_b64_image, wait_ready
from tests.lora_files import kohya_lora, peft_lora

PIXELS = Image.new("RGB", (64, 48), (128, 64, 32))
for _x in range(0, 64, 5):
    PIXELS.putpixel((_x, (_x * 7) % 48), (10, 200, 90))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return {
        "style": peft_lora(folder / "style", seed=1),
        "kohya": kohya_lora(folder / "kohya.safetensors", seed=2),
        "light": peft_lora(folder / "light", seed=3, rank=8, alpha=8.0, targets=["to_q", "to_v", "ff.net.2"]),
    }


def entries(files) -> list[str]:
    return [f"{name}={path}" for name, path in files.items()]


@pytest.fixture(scope="module")
def engine(files):
    """The tiny model with the three adapters (warm-up on, as served)."""
    engine = Engine(Settings(model="tiny", loras=entries(files)))
    engine.load()
    assert engine.ready, engine.reason
    return engine


def reference_engine(files, adapters: dict[str, float]) -> Engine:
    """The same tiny pipeline with diffusers' own LoRA loading (unfused q/k/v: what diffusers loads into)."""
    engine = Engine(Settings(model="tiny", warmup=False, fuse_qkv=False))
    engine.load()
    for name in adapters:
        engine.model.pipe.load_lora_weights(str(files[name]), adapter_name=name)
    engine.model.pipe.set_adapters(list(adapters), list(adapters.values()))
    return engine


def pixels(engine: Engine, loras=(), seed: int = 7) -> np.ndarray:
    result = engine.generate(Job(prompt="a red boat", seed=seed, image=PIXELS, steps=2, loras=tuple(loras)))
    return np.asarray(result.images[0]).astype(np.int16)


def test_scale_zero_gives_the_base_image_bit_for_bit(engine):
    base = pixels(engine)
    assert np.array_equal(pixels(engine, [("style", 0.0)]), base)
    assert np.array_equal(pixels(engine, [("style", 0.0), ("kohya", 0.0)]), base)
    assert not np.array_equal(pixels(engine, [("style", 1.0)]), base)  # the adapter does change it


@pytest.mark.parametrize(
    "adapters",
    [{"style": 0.7}, {"kohya": 1.3}, {"light": -0.8}, {"style": 0.7, "kohya": 1.3}],
    ids=["diffusers-peft-keys", "kohya-keys", "partial-targets-negative-scale", "two-combined"],
)
def test_matches_diffusers_load_lora_weights_and_set_adapters(engine, files, adapters):
    ours = pixels(engine, adapters.items())
    theirs = pixels(reference_engine(files, adapters))
    effect = np.abs(ours - pixels(engine)).mean()
    difference = np.abs(ours - theirs)
    # float noise (another summation order) may move a few 8-bit pixels by one step; the adapter moves many
    assert difference.max() <= 2 and difference.mean() < 0.01, (difference.max(), difference.mean())
    assert effect > 1.0


def test_alternating_adapters_gives_each_request_its_own_result(engine):
    choices = {
        "none": [],
        "style": [("style", 1.0)],
        "kohya": [("kohya", 1.0)],
        "both": [("kohya", 0.5), ("style", 1.0)],
    }
    first = {label: pixels(engine, loras) for label, loras in choices.items()}
    for label in ["kohya", "none", "both", "style"]:  # same seed, same bytes, whatever ran before
        assert np.array_equal(pixels(engine, choices[label]), first[label]), label
    labels = list(first)
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            assert not np.array_equal(first[a], first[b]), (a, b)


def test_more_adapters_than_the_gpu_keeps_are_loaded_back_from_host_memory(files):
    engine = Engine(Settings(model="tiny", warmup=False, loras=entries(files), lora_gpu_adapters=1))
    engine.load()
    style, kohya = pixels(engine, [("style", 1.0)]), pixels(engine, [("kohya", 1.0)])
    assert np.array_equal(pixels(engine, [("style", 1.0)]), style)
    assert np.array_equal(pixels(engine, [("kohya", 1.0)]), kohya)
    report = next(r for r in engine.reports if r.name == "lora").public()["data"]
    assert report["resident"] == ["kohya"] and report["evictions"] >= 3 and report["loads_from_host"] >= 4


# ----- over HTTP ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "garbage.safetensors").write_bytes(b"not a safetensors file")
    wrong = peft_lora(folder / "wrong", seed=4)  # renamed below: made for another model's layer names
    from safetensors.torch import load_file, save_file

    tensors = {k.replace("transformer_blocks.0.", "transformer_blocks.7."): v for k, v in load_file(wrong).items()}
    save_file(tensors, str(folder / "wrong.safetensors"))
    missing = f"missing={folder / 'nope.safetensors'}"
    settings = Settings(model="tiny", max_queue=8, loras=[*entries(files), missing], lora_dir=str(folder))
    with TestClient(create_app(settings)) as test_client:
        wait_ready(test_client)
        yield test_client


def body(**fields) -> dict:
    buffer = io.BytesIO()
    PIXELS.save(buffer, format="PNG")
    import base64

    image = base64.b64encode(buffer.getvalue()).decode()
    return {"prompt": "a red boat", "image": image, "seed": 7, "steps": 2, **fields}


def test_health_lists_the_adapters_and_why_bad_ones_were_skipped(client):
    health = client.get("/health").json()
    assert health["status"] == "ok"
    lora = next(r for r in health["optimizations"] if r["name"] == "lora")
    assert lora["status"] == "applied"
    assert sorted(lora["data"]["adapters"]) == ["kohya", "light", "style"]
    assert lora["data"]["adapters"]["light"]["rank"] == 8
    rejected = lora["data"]["rejected"]
    assert sorted(rejected) == ["garbage", "missing", "wrong"]
    assert "transformer_blocks.7" in rejected["wrong"] and "no such Linear layer" in rejected["wrong"]
    assert "cannot read" in rejected["garbage"] and "cannot read" in rejected["missing"]


def test_inference_reports_which_adapters_ran_with_their_scales(client):
    response = client.post("/inference", json=body(loras=[{"name": "style", "scale": 0.5}, {"name": "kohya"}]))
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["loras"] == [{"name": "style", "scale": 0.5, "rank": 4}, {"name": "kohya", "scale": 1.0, "rank": 4}]
    assert "lora" in data["optimizations"]["ran"]
    plain = client.post("/inference", json=body()).json()
    assert plain["loras"] == [] and "lora" not in plain["optimizations"]["ran"]
    assert plain["images"][0]["image"] != data["images"][0]["image"]


@pytest.mark.parametrize(
    ("loras", "words"),
    [
        ([{"name": "nope"}], "unknown LoRA adapter 'nope'"),
        ([{"name": "garbage"}], "unknown LoRA adapter 'garbage'"),
        ([{"name": "style", "scale": 2.5}], "outside [-2, 2]"),
        ([{"name": "style"}, {"name": "kohya"}, {"name": "light"}], "at most 2 per request"),
        ([{"name": "style"}, {"name": "style"}], "named twice"),
    ],
)
def test_unknown_names_and_out_of_range_scales_are_422_listing_the_loaded_adapters(client, loras, words):
    response = client.post("/inference", json=body(loras=loras))
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert words in message and "loaded adapters: kohya, light, style" in message


def test_a_lora_that_names_a_path_is_refused_as_an_unknown_name(client, files):
    response = client.post("/inference", json=body(loras=[{"name": str(files["style"])}]))
    assert response.status_code == 422


def test_a_form_sends_loras_as_json_text(client):
    buffer = io.BytesIO()
    PIXELS.save(buffer, format="PNG")
    fields = {"prompt": "a red boat", "seed": "7", "steps": "2", "loras": '[{"name": "light", "scale": 0.3}]'}
    response = client.post("/inference", data=fields, files={"image": ("in.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 200, response.text
    assert response.json()["loras"] == [{"name": "light", "scale": 0.3, "rank": 8}]


def test_openai_generations_take_loras_as_an_extra_field(client):
    """(An unknown name is a 400 there: OpenAI's routes answer validation errors 400, as OpenAI does.)"""
    fields = {"prompt": "a lighthouse", "size": "256x256", "seed": 3, "steps": 2}
    response = client.post("/v1/images/generations", json={**fields, "loras": [{"name": "kohya", "scale": 0.9}]})
    assert response.status_code == 200, response.text
    assert response.json()["loras"] == [{"name": "kohya", "scale": 0.9, "rank": 4}]
    refused = client.post("/v1/images/generations", json={**fields, "loras": [{"name": "nope"}]})
    assert refused.status_code == 400 and "loaded adapters: kohya, light, style" in refused.text


def test_async_jobs_run_adapters_and_refuse_unknown_names_at_submission(client):
    refused = client.post("/v1/jobs", json=body(loras=[{"name": "nope"}]))
    assert refused.status_code == 422 and "unknown LoRA adapter 'nope'" in refused.text
    accepted = client.post("/v1/jobs", json=body(loras=[{"name": "style", "scale": 1.0}]))
    assert accepted.status_code == 202, accepted.text
    deadline = time.monotonic() + 60
    while (state := client.get(accepted.json()["urls"]["get"]).json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert state["status"] == "succeeded", state
    assert state["result"]["loras"] == [{"name": "style", "scale": 1.0, "rank": 4}]
    direct = client.post("/inference", json=body(loras=[{"name": "style", "scale": 1.0}])).json()
    image = Image.open(io.BytesIO(client.get(accepted.json()["urls"]["image"]).content))
    assert np.array_equal(np.asarray(image), np.asarray(decode_b64_image(direct["images"][0]["image"])))


def test_a_server_without_adapters_says_so_when_a_request_names_one():
    with TestClient(create_app(Settings(model="tiny", warmup=False))) as client:
        wait_ready(client)
        response = client.post("/inference", json=body(loras=[{"name": "style"}]))
    assert response.status_code == 422
    assert "no LoRA adapters are loaded" in response.json()["error"]["message"]


# ----- settings ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["style", "=x.safetensors", "a b=x", "style=a,style=b"])
def test_bad_flux_loras_entries_are_refused_at_start(value, monkeypatch):
    monkeypatch.setenv("FLUX_LORAS", value)
    with pytest.raises(ValueError, match="FLUX_LORAS"):
        Settings(model="tiny")


def test_flux_loras_from_the_environment_as_a_comma_list_or_json(monkeypatch):
    monkeypatch.setenv("FLUX_LORAS", "style=/a/s.safetensors, light=owner/repo:light.safetensors")
    assert Settings(model="tiny").lora_sources == {"style": "/a/s.safetensors", "light": "owner/repo:light.safetensors"}
    monkeypatch.setenv("FLUX_LORAS", '["style=/a/s.safetensors"]')
    assert Settings(model="tiny").lora_sources == {"style": "/a/s.safetensors"}


def test_the_openapi_document_describes_loras_inline():
    with TestClient(create_app(Settings(model="tiny", warmup=False))) as client:
        document = client.get("/openapi.json").json()
    body = document["paths"]["/inference"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]["loras"]["items"]["properties"]) == {"name", "scale"}
    assert "#/$defs/" not in str(document)


def test_cuda_graphs_keep_a_graph_per_side_path_state_and_a_switch_between_adapters_replays(files):
    """Graphs are keyed on the side path being on or off: turning it on captures once; switching adapters is a copy
    into the same slots and replays (the CPU stand-in for CUDA graphs, tests/test_cuda_graphs.py)."""
    from flux_kontext.models import build_random_pipeline, step_inputs
    from flux_kontext.optimizations.cuda_graphs import CudaGraphs
    from flux_kontext.optimizations.lora import Lora
    from flux_kontext.stack import Hardware, Stack
    from tests.test_cuda_graphs import RerunBackend

    pipe = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)
    settings = Settings(model="tiny", loras=entries(files))
    stack = Stack([Lora(settings), CudaGraphs(settings, backend_factory=RerunBackend)])
    stack.apply(pipe, Hardware("cuda", (9, 0)))
    inputs = step_inputs(pipe.transformer.config, "cpu", torch.float32, 64, 64, text_tokens=16)

    def call(loras=()):
        with stack.request(Job(prompt="x", seed=0, loras=loras)) as run, torch.inference_mode():
            output = pipe.transformer(**inputs)[0].clone()
        return output, run.counters["cuda_graphs"]

    blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    plain, _ = call()
    assert call()[1]["captured"] == blocks
    with_style, counts = call([("style", 1.0)])
    assert counts["eager"] == blocks  # a new variant: run once, then captured
    assert call([("style", 1.0)])[1]["captured"] == blocks
    with_kohya, counts = call([("kohya", 1.0)])
    assert counts == {"replayed": blocks, "captured": 0, "eager": 0}
    again, counts = call()
    assert counts == {"replayed": blocks, "captured": 0, "eager": 0}
    assert torch.equal(again, plain) and not torch.equal(with_style, with_kohya)
    assert torch.equal(call([("style", 1.0)])[0], with_style)
