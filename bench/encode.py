"""Image encoding on the host: what the response path pays after the engine (issue 11's "service overhead").

For a 1024² noise image (what random weights produce: PNG's worst case) and a natural-looking one (smooth gradients,
shapes and mild noise, like a photo), each output format and PNG compression level: milliseconds to encode (median
of --runs), bytes out, and, for PNG, that the decoded pixels are identical (lossless stays lossless). Base64 timed
too. CPU only; run it on the serving host:

    python bench/encode.py --out bench/results/encode-<host>.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import statistics
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def natural_image(size: int = 1024, seed: int = 0) -> Image.Image:
    """Smooth gradients, a few soft shapes and mild sensor-like noise: compresses like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [np.sin(3 * x + c) * 0.5 + np.cos(2 * y - c) * 0.3 for c in (0.0, 1.3, 2.6)]
    image = np.stack(channels, -1)
    for _ in range(12):
        cx, cy, r = rng.random(3) * [1, 1, 0.2]
        image += ((x - cx) ** 2 + (y - cy) ** 2 < r**2)[..., None] * rng.normal(0, 0.4, 3)
    image += rng.normal(0, 0.02, image.shape)
    return Image.fromarray(((image - image.min()) / np.ptp(image) * 255).astype(np.uint8))


def noise_image(size: int = 1024, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def timed(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times), out


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


VARIANTS = [("PNG", {"compress_level": level}) for level in (0, 1, 2, 3, 6, 9)] + [
    ("PNG", {"compress_type": zlib.Z_RLE}),  # what the service uses (utils.PNG_OPTIONS)
    ("PNG", {"compress_level": 1, "compress_type": zlib.Z_HUFFMAN_ONLY}),
    ("JPEG", {"quality": 95}),
    ("WEBP", {"quality": 95}),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for name, image in (("natural", natural_image()), ("noise", noise_image())):
        pixels = np.asarray(image)
        for fmt, options in VARIANTS:
            ms, data = timed(lambda image=image, fmt=fmt, options=options: encode(image, fmt, **options), args.runs)
            b64_ms, _ = timed(lambda data=data: base64.b64encode(data), args.runs)
            row = {"image": name, "format": fmt, **options, "encode_ms": round(ms, 2), "bytes": len(data)}
            row["base64_ms"] = round(b64_ms, 2)
            if fmt == "PNG":
                row["lossless"] = bool(np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels))
            rows.append(row)
            print(json.dumps(row))
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version()},
        "pillow": PIL.__version__,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
