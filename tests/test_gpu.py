"""GPU checks (skipped without CUDA): the full-size random model, the whole stack, a 1024² edit over HTTP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from flux_kontext.service import create_app
from flux_kontext.settings import Settings
from tests.conftest import decode_b64_image, image_b64, wait_ready

pytestmark = pytest.mark.gpu


def test_random_model_is_full_size_and_serves_a_1024_edit_with_the_stack():
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

        if os.environ.get("FLUX_TEST_ARTIFACTS"):  # keep /health as the GPU saw it (bench/results/)
            Path(os.environ["FLUX_TEST_ARTIFACTS"], "health-gpu.json").write_text(json.dumps(health, indent=2))
        statuses = {r["name"]: r for r in health["optimizations"]}
        for name in ("fuse_qkv", "attention", "first_block_cache", "compile", "cuda_graphs", "dpm_solver"):
            assert statuses[name]["status"] == "applied", statuses[name]
        if health["device"]["capability"] in ("sm_89", "sm_90"):
            assert statuses["low_precision_gemm"]["status"] == "applied"
            assert "FP8" in statuses["low_precision_gemm"]["detail"]
            assert "MXFP4 needs FP4 tensor cores" in statuses["low_precision_gemm"]["detail"]
            # Every block's layers are FP8 on random weights: all 57 blocks run on the fused kernels.
            assert statuses["fused_gelu_fp8"]["status"] == "applied"
            assert statuses["fused_norm_rope"]["status"] == "applied"
            fused = statuses["fused_norm_rope"]["data"]
            assert {k: fused[k] for k in ("mlp_outputs", "single_blocks", "double_blocks")} == {
                "mlp_outputs": 76,
                "single_blocks": 38,
                "double_blocks": 19,
            }
            assert isinstance(fused["proj_out_residual_epilogue"]["use"], bool)  # measured at start, and said so
        assert statuses["flash_attention_3"]["status"] in ("applied", "skipped", "unavailable")

        response = client.post(
            "/inference", json={"prompt": "make the sky purple", "image": image_b64(1024, 1024), "seed": 1}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["images"][0]["width"], body["images"][0]["height"]) == (1024, 1024)
        assert decode_b64_image(body["images"][0]["image"]).size == (1024, 1024)
        assert body["steps"] == 14 and body["scheduler"] == "unipc"
        assert {"compile", "fuse_qkv", "dpm_solver", "cuda_graphs"} <= set(body["optimizations"]["ran"])
        # Warm-up captured the 1024² edit: all 57 blocks replay at every computed step.
        assert body["cuda_graphs"]["replayed"] == 57 * body["first_block_cache"]["computed"], body["cuda_graphs"]

        flags_off = {
            "use_mxfp4": False,
            "use_flash_attention": False,
            "use_dpm_solver": False,
            "use_cuda_graphs": False,
            "steps": 4,
        }
        response = client.post("/inference", json={"prompt": "a red fox", "width": 1024, "height": 1024, **flags_off})
        assert response.status_code == 200, response.text
        optimizations = response.json()["optimizations"]
        assert not {"flash_attention_3", "dpm_solver", "cuda_graphs"} & set(optimizations["ran"])
        assert response.json()["cuda_graphs"] == {"replayed": 0, "captured": 0, "eager": 0}
        assert response.json()["scheduler"] == "euler"
        if statuses["low_precision_gemm"]["status"] == "applied":
            assert [e["flag"] for e in optimizations["could_not_turn_off"]] == ["use_mxfp4"]

        # A resolution the warm-up did not see: its first step runs uncaptured, the second captures, the rest replay;
        # the same request again replays every step. The image is the same either way (same compiled kernels).
        wide = {"prompt": "a lighthouse", "width": 1344, "height": 768, "steps": 4, "seed": 3, "cache_threshold": 0}
        first = client.post("/inference", json=wide)
        assert first.status_code == 200, first.text
        assert (first.json()["images"][0]["width"], first.json()["images"][0]["height"]) == (1344, 768)
        assert first.json()["cuda_graphs"] == {"replayed": 57 * 2, "captured": 57, "eager": 57}
        again = client.post("/inference", json=wide)
        assert again.json()["cuda_graphs"] == {"replayed": 57 * 4, "captured": 0, "eager": 0}
        assert again.json()["images"][0]["image"] == first.json()["images"][0]["image"]
        shapes = {r["name"]: r for r in client.get("/health").json()["optimizations"]}["cuda_graphs"]["data"]
        assert [[1, 4032, 64], [1, 512, 4096]] in shapes["captured_shapes"]  # 84 x 48 packed latents, 512 T5 tokens
