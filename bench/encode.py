"""Image encoding on the host: what the response path pays after the engine (issue 11's "service overhead").

Part 1, PNG encoders compared (lossless, every output decoded and checked against the input pixels): Pillow with the
run-length strategy (``utils.PNG_OPTIONS``, the encoder before png_fast), Pillow's default, and png_fast
(flux_kontext/png_fast.py: numpy row filters, deflate by row bands in threads) in 1, 2 and all threads, with all its
filters and with Up only, and two filter block sizes; plus, where installed, other libraries (fpng, imagecodecs,
OpenCV) for reference. Images: natural-looking (smooth gradients, soft shapes, mild noise: compresses like a photo)
and noise (what random weights produce: PNG's worst case), 1024² and 1568x672.

Part 2, how late another Python thread (the GPU worker, say) gets to run while each encoder works (the GIL).

Part 3, the other formats and Pillow's compression levels at 1024², and base64.

Milliseconds are the median of --runs. CPU only; run it on the serving host:

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
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux_kontext.png_fast import ALL_FILTERS, BLOCK_BYTES, available_cpus, encode_png, thread_count  # noqa: E402

SIZES = ((1024, 1024), (1568, 672))  # (width, height)


def natural_image(width: int = 1024, height: int | None = None, seed: int = 0) -> Image.Image:
    """Smooth gradients, a few soft shapes and mild sensor-like noise: compresses like a photo, not like noise."""
    height = width if height is None else height
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(3 * x + c) * 0.5 + np.cos(2 * y - c) * 0.3 for c in (0.0, 1.3, 2.6)]
    image = np.stack(channels, -1)
    for _ in range(12):
        cx, cy, r = rng.random(3) * [1, 1, 0.2]
        image += ((x - cx) ** 2 + (y - cy) ** 2 < r**2)[..., None] * rng.normal(0, 0.4, 3)
    image += rng.normal(0, 0.02, image.shape)
    return Image.fromarray(((image - image.min()) / np.ptp(image) * 255).astype(np.uint8))


def noise_image(width: int = 1024, height: int | None = None, seed: int = 0) -> Image.Image:
    height = width if height is None else height
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def timed(fn, runs: int) -> tuple[float, object]:
    fn()  # first call out of the measurement (thread pool start, lazy imports)
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


def png_encoders(all_threads: int) -> dict:
    """name -> (image -> PNG bytes). png_fast takes the PIL image as the service hands it over (np.asarray in)."""
    encoders = {
        "pillow rle (before)": lambda image: encode(image, "PNG", compress_type=zlib.Z_RLE),
        "pillow default": lambda image: encode(image, "PNG"),
    }
    for threads in sorted({1, 2, all_threads}):
        encoders[f"png_fast {threads}t"] = lambda image, t=threads: encode_png(np.asarray(image), t)
        encoders[f"png_fast {threads}t up only"] = lambda image, t=threads: encode_png(np.asarray(image), t, (2,))
    for block in (BLOCK_BYTES // 4, BLOCK_BYTES * 16):  # 16 KiB, 1 MiB (a whole band of a 1024² image at once)
        encoders[f"png_fast {all_threads}t block {block // 1024}K"] = lambda image, b=block: encode_png(
            np.asarray(image), all_threads, ALL_FILTERS, b
        )
    encoders.update(other_libraries())
    return encoders


def other_libraries() -> dict:
    """For reference, where installed (none is a dependency of the service)."""
    found = {}
    try:
        import fpng

        found["fpng (library)"] = lambda image: fpng.from_ndarray(np.asarray(image))
    except ImportError:
        pass
    try:
        import imagecodecs

        found["imagecodecs png level 1 (library)"] = lambda image: imagecodecs.png_encode(np.asarray(image), level=1)
    except ImportError:
        pass
    try:
        import cv2

        found["opencv png level 1 (library)"] = lambda image: bytes(
            cv2.imencode(".png", np.asarray(image)[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])[1]
        )
    except ImportError:
        pass
    return found


VARIANTS = [("PNG", {"compress_level": level}) for level in (0, 1, 6, 9)] + [
    ("PNG", {"compress_type": zlib.Z_RLE}),
    ("JPEG", {"quality": 95}),
    ("WEBP", {"quality": 95}),
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compare_png(runs: int, all_threads: int) -> list[dict]:
    rows = []
    encoders = png_encoders(all_threads)
    for width, height in SIZES:
        for name, image in (("natural", natural_image(width, height)), ("noise", noise_image(width, height))):
            pixels = np.asarray(image)
            for encoder, fn in encoders.items():
                ms, data = timed(lambda fn=fn, image=image: fn(image), runs)
                lossless = bool(np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels))
                row = {"image": name, "size": f"{width}x{height}", "encoder": encoder, "encode_ms": round(ms, 2)}
                rows.append({**row, "bytes": len(data), "lossless": lossless})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def gil_wait(encoders: dict, runs: int) -> list[dict]:
    """How long another Python thread (as the GPU worker launching the next job's kernels) waits to run while an
    encoder works: a thread asking to run every 0.2 ms records how late it ran (its sleep's overshoot: the wait
    for the GIL, and for a core), during ``runs`` encodes of the natural-looking 1024² image; 'idle' is the same
    with no encoding."""
    image = natural_image()
    rows = []
    for name in ["idle", *(name for name in encoders if "up only" not in name)]:
        lateness, done = [], threading.Event()
        ticker = threading.Thread(target=_tick, args=(lateness, done), daemon=True)
        ticker.start()
        if name == "idle":
            time.sleep(0.2)
        else:
            for _ in range(runs):
                encoders[name](image)
        done.set()
        ticker.join()
        lateness.sort()
        row = {"encoder": name, "ticks": len(lateness), "late_ms_median": round(statistics.median(lateness), 3)}
        rows.append({**row, "late_ms_p99": round(lateness[int(0.99 * (len(lateness) - 1))], 3)})
        rows[-1]["late_ms_max"] = round(lateness[-1], 3)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _tick(lateness: list[float], done: threading.Event) -> None:
    while not done.is_set():
        start = time.perf_counter()
        time.sleep(0.0002)
        lateness.append((time.perf_counter() - start) * 1000.0 - 0.2)


def formats(runs: int) -> list[dict]:
    rows = []
    for name, image in (("natural", natural_image()), ("noise", noise_image())):
        pixels = np.asarray(image)
        for fmt, options in VARIANTS:
            ms, data = timed(lambda image=image, fmt=fmt, options=options: encode(image, fmt, **options), runs)
            b64_ms, _ = timed(lambda data=data: base64.b64encode(data).decode("ascii"), runs)
            row = {"image": name, "format": fmt, **options, "encode_ms": round(ms, 2), "bytes": len(data)}
            row["base64_ms"] = round(b64_ms, 2)
            if fmt == "PNG":
                row["lossless"] = bool(np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-formats", action="store_true", help="only the PNG encoders (parts 1 and 2)")
    args = parser.parse_args()
    all_threads = thread_count(0)
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
        "host": {
            "cpu_model": cpu_model(),
            "cpus_available": available_cpus(),
            "png_fast_threads_all": all_threads,
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
    }
    result["png"] = compare_png(args.runs, all_threads)
    result["gil_wait"] = gil_wait(png_encoders(all_threads), args.runs)
    if not args.skip_formats:
        result["rows"] = formats(args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    failed = [row for row in result["png"] if not row["lossless"]]
    if failed:
        print(f"NOT LOSSLESS: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
