"""Output sizes: the preferred Kontext resolutions and snapping an input image to the nearest one."""

from __future__ import annotations

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
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return w, h
