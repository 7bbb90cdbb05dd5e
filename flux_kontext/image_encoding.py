"""Output images to bytes, as FLUX_PNG_ENCODER chose: PNG through png_fast (the default) or Pillow, JPEG and WebP
through Pillow. What encoded each image is reported (``images[].encoder`` of a response, ``encoding`` in /health).
Pillow stays the fallback: for image modes png_fast does not write, and should it ever fail."""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from flux_kontext.png_fast import SINGLE_THREAD_BYTES, available_cpus, encode_png, thread_count
from utils import image_bytes

log = logging.getLogger(__name__)

FAST_MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}  # Pillow mode -> channels png_fast writes (8 bits each)
PNG_FAST, PILLOW = "png_fast", "pillow"


@dataclass(frozen=True)
class ImageEncoder:
    """``png``: 'fast' or 'pillow'; ``threads``: threads one PNG is deflated in (0: the available CPUs)."""

    png: str = "fast"
    threads: int = 0

    @classmethod
    def from_settings(cls, settings) -> ImageEncoder:
        return cls(png=settings.png_encoder, threads=settings.png_threads)

    @property
    def png_threads(self) -> int:
        return thread_count(self.threads)

    def encode(self, img: Image.Image, output_format: str, quality: int = 95) -> tuple[bytes, str]:
        """(the image's bytes in png, jpeg or webp, what encoded them: 'png_fast' or 'pillow')."""
        if output_format == "png" and self.png == "fast" and img.mode in FAST_MODES:
            try:
                return encode_png(np.asarray(img), self.png_threads), PNG_FAST
            except Exception:  # a bug here must not cost the user the image: Pillow writes it, and we say so
                log.exception("png_fast failed on a %s %dx%d image; encoded with Pillow instead", img.mode, *img.size)
        return image_bytes(img, output_format, quality), PILLOW

    def encode_base64(self, img: Image.Image, output_format: str, quality: int = 95) -> tuple[str, str]:
        """``encode`` with the bytes in base64."""
        data, encoder = self.encode(img, output_format, quality)
        return base64.b64encode(data).decode("ascii"), encoder

    def describe(self) -> dict:
        """For /health: which PNG encoder runs and in how many threads."""
        fast = self.png == "fast"
        return {
            "png": PNG_FAST if fast else PILLOW,
            "png_threads": self.png_threads if fast else 1,  # images of fewer pixel bytes than the next: one thread
            "png_single_thread_below_bytes": SINGLE_THREAD_BYTES if fast else None,
            "cpus_available": available_cpus(),
            "jpeg_webp": PILLOW,
        }
