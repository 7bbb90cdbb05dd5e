"""The fast PNG writer (flux_kontext/png_fast.py) and the encoder choice around it: every PNG decodes to exactly the
input pixels, is a valid PNG to the byte (chunk CRCs, the zlib stream's Adler-32), and what encoded it is reported."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from flux_kontext import image_encoding
from flux_kontext.image_encoding import ImageEncoder
from flux_kontext.png_fast import FILTERS, adler32_combine, encode_png
from tests.conftest import decode_b64_image, make_client, wait_ready

MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def pixels(height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    """Top half smooth gradients (Average/Paeth territory), bottom half noise, a flat stripe (runs)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([(x * (c + 1) + y * 2) % 256 for c in range(channels)], -1).astype(np.uint8)
    noise = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    out = np.where((y < height // 2)[..., None], smooth, noise).astype(np.uint8)
    out[: max(1, height // 5)] = 77
    return out


def decoded(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, each CRC checked."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    out, at = [], 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind, data = png[at + 4 : at + 8], png[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", png[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(data, zlib.crc32(kind)), f"bad CRC in {kind}"
        out.append((kind, data))
        at += 12 + length
    return out


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [(1, 1), (1, 9), (9, 1), (5, 3), (17, 33), (300, 301)])
def test_png_decodes_to_exactly_the_input_pixels(channels, size):
    want = pixels(*size, channels)
    image = decoded(encode_png(want, threads=4))
    assert image.mode == MODES[channels] and image.size == (size[1], size[0])
    assert np.array_equal(np.asarray(image).reshape(want.shape), want)


@pytest.mark.parametrize("kind", range(len(FILTERS)))
def test_every_filter_alone_is_lossless(kind):
    want = pixels(67, 45, 3, seed=kind)
    assert np.array_equal(np.asarray(decoded(encode_png(want, filters=(kind,)))), want)


@pytest.mark.parametrize("threads", [1, 4])
def test_each_band_takes_the_filter_that_suits_it(threads):
    """Top half vertical stripes (Up leaves zeros), bottom half a ramp per row (Sub leaves a run): choosing per
    band beats every single filter by far, and stays lossless."""
    rng = np.random.default_rng(0)
    top = np.broadcast_to(rng.integers(0, 256, (1, 512, 3), dtype=np.uint8), (256, 512, 3))
    ramps = (np.arange(512)[None, :, None] * rng.integers(1, 9, (256, 1, 1)) % 256).astype(np.uint8).repeat(3, 2)
    want = np.concatenate([top, ramps])
    png = encode_png(want, threads=threads)
    assert len(png) < 0.5 * min(len(encode_png(want, filters=(kind,))) for kind in range(len(FILTERS)))
    assert np.array_equal(np.asarray(decoded(png)), want)


@pytest.mark.parametrize("threads", [1, 2, 7])
def test_large_images_in_threads_are_valid_pngs_to_the_byte(threads):
    want = pixels(672, 1568, 3)  # 3 MiB of pixels: cut into bands, deflated in parallel
    png = encode_png(want, threads=threads)
    parts = chunks(png)
    assert [kind for kind, _ in parts][:1] == [b"IHDR"] and parts[-1] == (b"IEND", b"")
    idat = b"".join(data for kind, data in parts if kind == b"IDAT")
    raw = zlib.decompress(idat)  # checks the zlib header and the Adler-32 of the whole stream
    assert len(raw) == 672 * (1568 * 3 + 1)
    assert np.array_equal(np.asarray(decoded(png)), want)
    assert png == encode_png(want, threads=threads)  # deterministic


def test_grey_2d_arrays_are_accepted_and_bad_ones_refused():
    grey = pixels(10, 12, 1)[:, :, 0]
    assert np.array_equal(np.asarray(decoded(encode_png(grey))), grey)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(grey.astype(np.uint16))
    with pytest.raises(ValueError, match="pixels"):
        encode_png(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="pixels"):
        encode_png(np.zeros((0, 4, 3), np.uint8))


def test_adler32_combine_matches_zlib():
    rng = np.random.default_rng(3)
    for first_len, second_len in [(0, 5), (5, 0), (1, 1), (70_000, 123_457), (5_552, 65_521)]:
        first = rng.integers(0, 256, first_len, dtype=np.uint8).tobytes()
        second = rng.integers(0, 256, second_len, dtype=np.uint8).tobytes()
        combined = adler32_combine(zlib.adler32(first), zlib.adler32(second), second_len)
        assert combined == zlib.adler32(first + second)


def test_the_encoder_reports_what_encoded_each_image(monkeypatch):
    rgb = Image.fromarray(pixels(40, 30, 3))
    data, used = ImageEncoder().encode(rgb, "png")
    assert used == "png_fast" and np.array_equal(np.asarray(decoded(data)), np.asarray(rgb))
    assert ImageEncoder(png="pillow").encode(rgb, "png")[1] == "pillow"
    assert ImageEncoder().encode(rgb, "jpeg", 90)[1] == "pillow"
    palette = rgb.convert("P")  # a mode png_fast does not write: Pillow does, losslessly
    data, used = ImageEncoder().encode(palette, "png")
    assert used == "pillow" and np.array_equal(
        np.asarray(decoded(data).convert("RGB")), np.asarray(palette.convert("RGB"))
    )

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(image_encoding, "encode_png", broken)
    data, used = ImageEncoder().encode(rgb, "png")  # the fallback: the user still gets the image
    assert used == "pillow" and np.array_equal(np.asarray(decoded(data)), np.asarray(rgb))


def test_responses_and_health_report_the_png_encoder(client):
    health = client.get("/health").json()["encoding"]
    assert health["png"] == "png_fast" and health["png_threads"] >= 1 and health["cpus_available"] >= 1
    body = client.post("/inference", json={"prompt": "a fox", "width": 256, "height": 256, "steps": 1}).json()
    assert [image["encoder"] for image in body["images"]] == ["png_fast"]
    assert decoded_format(body["images"][0]["image"]) == ("PNG", (256, 256))
    jpeg = client.post(
        "/inference", json={"prompt": "a fox", "width": 256, "height": 256, "steps": 1, "output_format": "jpeg"}
    ).json()
    assert jpeg["images"][0]["encoder"] == "pillow"


def test_the_pillow_setting_is_used_and_reported():
    with make_client(png_encoder="pillow", png_threads=3) as client:
        wait_ready(client)
        assert client.get("/health").json()["encoding"]["png"] == "pillow"
        body = client.post("/inference", json={"prompt": "a fox", "width": 256, "height": 256, "steps": 1}).json()
        assert body["images"][0]["encoder"] == "pillow"
        assert decoded_format(body["images"][0]["image"]) == ("PNG", (256, 256))


def decoded_format(data: str) -> tuple[str, tuple[int, int]]:
    image = decode_b64_image(data)
    return image.format, image.size
