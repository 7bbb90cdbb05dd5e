"""Output sizes: the preferred Kontext resolutions and snapping an input image to the nearest one."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Mode = Literal["edit", "text_to_image"]
PIXELS_PER_TOKEN_SIDE = 16  # 8x VAE downsampling, then 2x2 latent packing


def image_tokens(width: int, height: int, context: tuple[int, int] | None = None) -> int:
    """Image tokens the transformer sees for an output of ``width`` x ``height``, plus an edit's context image."""
    tokens = (width // PIXELS_PER_TOKEN_SIDE) * (height // PIXELS_PER_TOKEN_SIDE)
    return tokens + (image_tokens(*context) if context else 0)


@dataclass(frozen=True)
class RequestShape:
    """What a request brings to the model's memory and compiled code: mode, output size, batch, true CFG and an
    edit's context image size (None: the output's size). The memory plan and warm-up both speak in it."""

    mode: Mode
    width: int
    height: int
    num_images: int = 1
    true_cfg: bool = False
    context: tuple[int, int] | None = None  # edit only; None: the output's size

    @property
    def edit(self) -> bool:
        return self.mode == "edit"

    @property
    def context_size(self) -> tuple[int, int] | None:
        if not self.edit:
            return None
        return self.context or (self.width, self.height)

    @property
    def tokens(self) -> int:
        """Image tokens the transformer sees (2x2-packed latents of the 8x VAE: 16x16 pixels per token)."""
        return image_tokens(self.width, self.height, self.context_size)


# The 17 resolutions FLUX.1-Kontext was trained on (BFL reference; also in diffusers' Kontext pipeline).
PREFERRED_KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)


def kontext_resolution(width: int, height: int) -> tuple[int, int]:
    """The preferred (width, height) whose aspect ratio is closest to the input's.

    Ties go to the smaller size, the same rule as diffusers' ``_auto_resize``, so output and context
    image agree with what the reference pipeline would pick.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return resolution_for_aspect(width / height)


def resolution_for_aspect(aspect: float) -> tuple[int, int]:
    """The preferred (width, height) nearest to a width/height ratio (ties to the smaller size)."""
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return w, h


# The ratios the preferred resolutions span: 672x1568 is exactly 9:21, 1568x672 is 21:9. A ratio outside would
# snap to an end and be silently something else, so it is refused instead.
WIDEST_ASPECT = 21 / 9
_ASPECT_RATIO = re.compile(r"^\s*(\d{1,3})\s*:\s*(\d{1,3})\s*$")


def parse_aspect_ratio(text: str) -> float:
    """'16:9' -> 16/9; ValueError (with the accepted form) for anything else or a ratio beyond 21:9 / 9:21."""
    match = _ASPECT_RATIO.match(text)
    if not match or not int(match[1]) or not int(match[2]):
        raise ValueError(f"expected 'W:H' such as '16:9' (or 'match_input_image'), got {text!r}")
    aspect = int(match[1]) / int(match[2])
    if not 1 / WIDEST_ASPECT - 1e-9 <= aspect <= WIDEST_ASPECT + 1e-9:
        raise ValueError(f"{text!r} is outside 9:21 to 21:9, the range of the Kontext resolutions")
    return aspect
