"""GPU checks (skipped without CUDA): the full-size random model builds and serves a 1024² edit."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from flux_kontext.service import create_app
from flux_kontext.settings import Settings
from tests.conftest import decode_b64_image, image_b64, wait_ready

pytestmark = pytest.mark.gpu


def test_random_model_is_full_size_and_serves_a_1024_edit():
    app = create_app(Settings(model="random"))
    with TestClient(app) as client:
        health = wait_ready(client, timeout_s=600)
        assert health["device"]["type"] == "cuda"
        assert health["model"]["kind"] == "random"
        engine = app.state.service.engine
        transformer = engine.model.pipe.transformer
        assert len(transformer.transformer_blocks) == 19 and len(transformer.single_transformer_blocks) == 38
        # 11.9B: the fused q|k|v layers replace the separate ones (layout.apply_fuse_qkv drops those).
        assert 11.5e9 < sum(p.numel() for p in transformer.parameters()) < 12.5e9
        t5 = engine.model.pipe.text_encoder_2
        assert 4.5e9 < sum(p.numel() for p in t5.parameters()) < 5.0e9

        response = client.post(
            "/inference", json={"prompt": "make the sky purple", "image": image_b64(1024, 1024), "steps": 4, "seed": 1}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["images"][0]["width"], body["images"][0]["height"]) == (1024, 1024)
        assert decode_b64_image(body["images"][0]["image"]).size == (1024, 1024)
        assert body["timings_ms"]["denoising"] > 0
