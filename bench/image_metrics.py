"""Image and latent agreement for the fidelity benches: PSNR, SSIM and relative error.

SSIM is Wang et al. 2004 (IEEE TIP 13(4)): an 11x11 Gaussian window of std 1.5, K1 = 0.01, K2 = 0.03, on each RGB
channel at data range 255, averaged over the image and the channels (the common single-scale form).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SSIM_WINDOW, SSIM_STD, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _pixels(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float64 in 0..255."""
    array = np.asarray(image.convert("RGB"), dtype=np.float64)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def psnr(image: Image.Image, reference: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    mse = float(((_pixels(image) - _pixels(reference)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(image: Image.Image, reference: Image.Image) -> float:
    x, y = _pixels(image), _pixels(reference)
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float64) - SSIM_WINDOW // 2
    g = torch.exp(-(coords**2) / (2 * SSIM_STD**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(3, 1, SSIM_WINDOW, SSIM_WINDOW)

    def blur(t):
        return F.conv2d(t, window, groups=3)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(index.mean())


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm())
