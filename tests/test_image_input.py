"""Input images as phones and editors produce them: MPO JPEGs, EXIF rotation, 16-bit, transparency."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from utils import decode_image


def b64(img: Image.Image, fmt: str, **options) -> str:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return base64.b64encode(buffer.getvalue()).decode()


def test_multi_picture_jpeg_uses_its_first_frame():
    first, second = Image.new("RGB", (64, 48), (10, 20, 30)), Image.new("RGB", (64, 48), (200, 20, 30))
    decoded = decode_image(b64(first, "MPO", save_all=True, append_images=[second]), 10**8)
    assert decoded.size == (64, 48)
    assert np.abs(np.asarray(decoded, dtype=int)[0, 0] - [10, 20, 30]).max() <= 3


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (640, 480), (1, 2, 3))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise for display: a portrait photo stored landscape
    assert decode_image(b64(img, "JPEG", exif=exif), 10**8).size == (480, 640)


def test_16_bit_png_is_scaled_not_clipped():
    img = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    assert decode_image(b64(img, "PNG"), 10**8).getpixel((0, 0)) == (156, 156, 156)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_on_white(mode):
    img = Image.new(mode, (8, 8), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))
    assert decode_image(b64(img, "PNG"), 10**8).getpixel((0, 0)) == (255, 255, 255)


def test_pixels_to_pil_gives_the_pixels_diffusers_postprocess_gives():
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from utils import pixels_to_pil

    g = torch.Generator().manual_seed(0)
    decoded = (torch.randn(2, 3, 24, 40, generator=g) * 0.8).to(torch.bfloat16)  # VAE output, beyond [-1, 1] too
    decoded[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 0.0, 127.5 / 127.5 - 1])  # the ends and a round-half case
    processor = VaeImageProcessor(vae_scale_factor=16)
    expected = processor.postprocess(decoded, output_type="pil")
    ours = pixels_to_pil(processor.postprocess(decoded, output_type="pt"))
    assert [im.size for im in ours] == [(40, 24), (40, 24)] and all(im.mode == "RGB" for im in ours)
    for got, want in zip(ours, expected, strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert len({np.asarray(im).tobytes() for im in ours}) == 2  # not a constant image
