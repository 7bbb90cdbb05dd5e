"""Small leaf helpers: image decoding/encoding, seeds, timers. Imports nothing of this project."""

from __future__ import annotations

import base64
import binascii
import io
import re
import secrets
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps

DECODERS = ("PNG", "JPEG", "WEBP")  # the only decoders untrusted bytes reach (the JPEG one also opens MPO)
# MPO: a JPEG holding more than one image (phone "Ultra HDR" / gain-map photos); its first frame is the photo.
ACCEPTED_INPUT_FORMATS = ("PNG", "JPEG", "MPO", "WEBP")
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# zlib's run-length strategy after PNG's row filters: 5x faster than Pillow's default on a natural-looking 1024² image
# and a smaller file, the same pixels (bench/encode.py; BENCHMARKS.md, "Image encoding").
PNG_OPTIONS = {"compress_type": zlib.Z_RLE}
MAX_SEED = 2**63 - 1
# Recognised only to answer 415 with the format's name; never decoded.
_RECOGNISED_ONLY = ("GIF", "BMP", "TIFF", "ICO")
_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]*)?(;[\w=.-]+)*;base64,", re.IGNORECASE)


class ImageInputError(ValueError):
    """An input image that cannot be used; carries the HTTP status and a machine-readable code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _b64_payload(data: str) -> bytes:
    text = data.strip()
    match = _DATA_URI.match(text)
    if match:
        text = text[match.end() :]
    elif text.startswith("data:"):
        raise ImageInputError(400, "invalid_image", "data: URI must be base64-encoded ('data:image/png;base64,...')")
    text = re.sub(r"\s+", "", text)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError(400, "invalid_base64", f"'image' is not valid base64: {exc}") from None


def decode_image(data: str, max_pixels: int) -> Image.Image:
    """Decode a base64 string or data: URI into an RGB PIL image.

    The size is read from the header and checked against ``max_pixels`` before any pixel is decoded,
    so a decompression bomb costs nothing.
    """
    raw = _b64_payload(data)
    if not raw:
        raise ImageInputError(400, "invalid_image", "'image' is empty")
    try:
        img = Image.open(io.BytesIO(raw), formats=DECODERS + _RECOGNISED_ONLY)
    except Image.DecompressionBombError as exc:  # PIL's own, larger limit, hit while reading the header
        raise ImageInputError(413, "image_too_large", _too_large(max_pixels, str(exc))) from None
    except Exception:
        raise ImageInputError(
            400, "invalid_image", "'image' is not a readable image; send a base64 PNG, JPEG or WebP"
        ) from None
    if img.format not in ACCEPTED_INPUT_FORMATS:
        raise ImageInputError(
            415, "unsupported_image_format", f"image format {img.format} is not accepted; send PNG, JPEG or WebP"
        )
    width, height = img.size
    if width * height > max_pixels:
        raise ImageInputError(413, "image_too_large", _too_large(max_pixels, f"it is {width}x{height}"))
    try:
        img.load()
    except Exception as exc:
        raise ImageInputError(
            400, "invalid_image", f"'image' could not be decoded (truncated or corrupt?): {exc}"
        ) from None
    return to_rgb(ImageOps.exif_transpose(img))


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as the model sees it: 16-bit scaled to 8, transparency composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # convert() would clip 16-bit values at 255 (a mid-grey of 40000 turns white); scale them instead.
        top = 65535 if img.mode.startswith("I;16") else max(int(np.asarray(img).max()), 1)
        img = Image.fromarray((np.asarray(img, dtype=np.float64) * (255.0 / top)).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _too_large(max_pixels: int, what: str) -> str:
    return (
        f"input image is too large ({what}); the limit is {max_pixels} pixels (FLUX_MAX_INPUT_PIXELS). "
        "Downscale it first: it is resized to at most 1568 px a side anyway."
    )


def pixels_to_pil(images) -> list[Image.Image]:
    """(batch, 3, H, W) images in [0, 1] (any device) to PIL, with diffusers' arithmetic (fp32, x255, round half to
    even, uint8) done where the tensor lives: on a GPU only the uint8 pixels cross to the host (a quarter of the
    float copy diffusers' postprocess makes), and the host does no per-pixel work."""
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def image_bytes(img: Image.Image, output_format: str, quality: int = 95) -> bytes:
    """Encode an image in png, jpeg or webp (deterministic for the same pixels); ``quality`` (0-100) is the
    JPEG/WebP encoder's, unused for the lossless png."""
    buffer = io.BytesIO()
    pil_format = OUTPUT_FORMATS[output_format]
    options = {"quality": quality} if pil_format in ("JPEG", "WEBP") else PNG_OPTIONS
    img.save(buffer, format=pil_format, **options)
    return buffer.getvalue()


def new_seed() -> int:
    """A fresh random seed (32 bits: short enough to copy by hand, valid for every generator)."""
    return secrets.randbelow(2**32)


@dataclass
class PhaseTimer:
    """Accumulates wall-clock milliseconds per named phase; ``sync`` is called at every boundary."""

    sync: object = None
    phases: dict[str, float] = field(default_factory=dict)

    def _now(self) -> float:
        if callable(self.sync):
            self.sync()
        return time.perf_counter()

    def measure(self, name: str):
        return _Measured(self, name)

    def add(self, name: str, ms: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + ms


class _Measured:
    def __init__(self, timer: PhaseTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        self.start = self.timer._now()
        return self

    def __exit__(self, *exc):
        self.timer.add(self.name, (self.timer._now() - self.start) * 1000.0)
        return False
