"""A lossless PNG writer that uses the host's cores: PNG's row filters done in numpy, the deflate split by row bands
compressed in parallel threads (zlib and numpy release the GIL), one valid PNG out.

Each band of rows gets the filter that minimises the sum of absolute residuals over a sample of its rows (Paeth wins
on photos, Average on smooth gradients, none of them on noise), and is deflated with zlib's run-length strategy, the
one Pillow's encoder was measured fastest with (``utils.PNG_OPTIONS``). A run-length match only reaches one pixel
back, so cutting the stream at band boundaries costs no compression. Bands end with a sync flush (byte-aligned, not
final) and travel as IDAT chunks of their own, their CRCs computed in the worker; the zlib header goes first and the
Adler-32 of the whole filtered stream, combined from the bands' own, last. Any PNG decoder reads it as one image.

Only 8-bit L, LA, RGB and RGBA pixels; everything else is for Pillow (``flux_kontext/image_encoding.py`` falls back).
bench/encode.py compares it with Pillow; BENCHMARKS.md, "Image encoding on the host".
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)
MAX_THREADS = 16  # more cores than this do not shorten a 1568² image further (bands of ~16 rows)
SINGLE_THREAD_BYTES = 256 * 1024  # below this much pixel data the threads' hand-offs cost more than they save
_SAMPLE_EVERY = 8  # rows a band's filter choice looks at: one in eight
# Pixel bytes filtered at once: small enough that the filter's int16 temporaries stay in L2 (filtering 128 rows of a
# 1024² RGB image at once ran Paeth 1.2-3x slower), large enough that each numpy call releases the GIL for long.
BLOCK_BYTES = 64 * 1024
_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ZLIB_HEADER = b"\x78\x01"  # deflate, 32 KiB window, "fastest" level (a hint only)
_ADLER_BASE = 65521
FILTERS = ("none", "sub", "up", "average", "paeth")  # PNG filter type = index
ALL_FILTERS = (0, 1, 2, 3, 4)

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as taskset or a container's cpuset set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def thread_count(requested: int = 0) -> int:
    """``requested`` threads, or (0) the available CPUs up to MAX_THREADS."""
    return requested if requested > 0 else max(1, min(available_cpus(), MAX_THREADS))


def encode_png(
    pixels: np.ndarray, threads: int = 1, filters: tuple[int, ...] = ALL_FILTERS, block_bytes: int = BLOCK_BYTES
) -> bytes:
    """A PNG of ``pixels`` (uint8, (H, W) or (H, W, C) with C 1-4), decoding to exactly these values; row bands
    compressed in ``threads`` threads (1: all in the caller's thread; small images always are). ``filters``: the
    PNG filter types a band may choose from (``FILTERS``' indices); ``block_bytes``: bytes filtered per numpy pass."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"encode_png takes uint8 pixels, not {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in COLOR_TYPES or 0 in pixels.shape:
        raise ValueError(f"encode_png takes (H, W) or (H, W, 1-4) pixels, not {pixels.shape}")
    height, width, channels = pixels.shape
    rows = pixels.reshape(height, width * channels)
    if pixels.nbytes < SINGLE_THREAD_BYTES:
        threads = 1
    bands = _bands(height, threads)
    kinds = _choose(rows, bands, channels, filters, block_bytes)
    jobs = [(rows, start, stop, kind, channels, block_bytes) for (start, stop), kind in zip(bands, kinds, strict=True)]
    if threads == 1:
        parts = [_band(*job) for job in jobs]
    else:
        pool = _pool(threads)
        parts = [future.result() for future in [pool.submit(_band, *job) for job in jobs]]
    adler, total = parts[0][1], parts[0][2]
    for _, band_adler, length in parts[1:]:
        adler = adler32_combine(adler, band_adler, length)
        total += length
    header = struct.pack(">IIBBBBB", width, height, 8, COLOR_TYPES[channels], 0, 0, 0)
    return b"".join(
        [_SIGNATURE, _chunk(b"IHDR", header), *(chunk for chunk, _, _ in parts)]
        + [_chunk(b"IDAT", struct.pack(">I", adler)), _chunk(b"IEND", b"")]
    )


def _bands(height: int, threads: int) -> list[tuple[int, int]]:
    """Row ranges: about four per thread (the slow ones even out), never under 16 rows (each starts on a row the
    filter choice samples), at most 128."""
    rows = min(128, max(16, -(-height // (4 * threads * _SAMPLE_EVERY)) * _SAMPLE_EVERY)) if threads > 1 else 128
    return [(start, min(start + rows, height)) for start in range(0, height, rows)]


def _pool(threads: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="png")
        return _pools[threads]


def _band(rows: np.ndarray, start: int, stop: int, kind: int, channels: int, block_bytes: int):
    """One band filtered with ``kind`` and deflated: (its IDAT chunk, the Adler-32 of its filtered bytes, their
    length)."""
    filtered = np.empty((stop - start, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = kind
    block = max(1, block_bytes // rows.shape[1])
    for low in range(start, stop, block):  # a few rows at a time: the filter's temporaries stay in the L1/L2 cache
        high = min(low + block, stop)
        above = rows[low - 1 : high - 1] if low > 0 else _rows_above(rows, np.arange(low, high))
        filtered[low - start : high - start, 1:] = _filter(kind, rows[low:high], above, channels)
    data = filtered.data  # no copy: zlib and adler32 read the buffer
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15, 9, zlib.Z_RLE)  # raw deflate: one zlib header for all
    last = stop == rows.shape[0]
    deflated = compressor.compress(data) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
    return _chunk(b"IDAT", deflated if start else _ZLIB_HEADER + deflated), zlib.adler32(data), filtered.nbytes


def _rows_above(rows: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The row above each of ``indices`` (a copy), zeros above the top row."""
    above = rows[np.maximum(indices - 1, 0)]
    if indices[0] == 0:
        above[0] = 0
    return above


def _choose(
    rows: np.ndarray, bands: list[tuple[int, int]], channels: int, filters: tuple[int, ...], block_bytes: int
) -> list[int]:
    """Each band's filter: the one with the smallest sum of |residual| (residuals read as signed bytes) over the
    band's sampled rows. All bands' samples are filtered together, in the caller's thread: a few large numpy calls
    rather than many small ones in each worker, each taking the GIL."""
    if len(filters) == 1:
        return [filters[0]] * len(bands)
    sample = np.arange(0, rows.shape[0], _SAMPLE_EVERY)
    per_row = np.empty((len(filters), len(sample)), np.uint64)
    block = max(1, block_bytes // rows.shape[1])
    for low in range(0, len(sample), block):  # a few rows at a time, as in _band
        some = sample[low : low + block]
        current, above = rows[some], _rows_above(rows, some)
        for i, kind in enumerate(filters):
            residual = _filter(kind, current, above, channels)
            per_row[i, low : low + block] = np.minimum(residual, 0 - residual).sum(axis=1, dtype=np.uint64)
    starts = [start // _SAMPLE_EVERY for start, _ in bands]  # bands start on sampled rows (multiples of 8)
    best = np.add.reduceat(per_row, starts, axis=1).argmin(axis=0)
    return [filters[i] for i in best]


def _left(values: np.ndarray, channels: int) -> np.ndarray:
    shifted = np.zeros_like(values)
    shifted[:, channels:] = values[:, :-channels]
    return shifted


def _filter(kind: int, current: np.ndarray, above: np.ndarray, channels: int) -> np.ndarray:
    """PNG filter ``kind`` of rows ``current`` (uint8), ``above`` holding the row above each (zeros above the top)."""
    if kind == 0:
        return current
    if kind == 2:
        return current - above
    left = _left(current, channels)
    if kind == 1:
        return current - left
    if kind == 3:  # floor((left + above) / 2) without leaving uint8
        return current - ((left & above) + ((left ^ above) >> 1))
    a, b = left.astype(np.int16), above.astype(np.int16)
    c = _left(b, channels)
    up_minus_corner, left_minus_corner = b - c, a - c
    pa, pb = np.abs(up_minus_corner), np.abs(left_minus_corner)  # |p - a|, |p - b| with p = a + b - c
    pc = np.abs(up_minus_corner + left_minus_corner)  # |p - c|
    predictor = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    return current - predictor.astype(np.uint8)


def adler32_combine(first: int, second: int, second_length: int) -> int:
    """The Adler-32 of A + B from those of A and B and B's length (zlib's adler32_combine)."""
    low = ((first & 0xFFFF) + (second & 0xFFFF) - 1) % _ADLER_BASE
    high = ((first >> 16) + (second >> 16) + second_length * ((first & 0xFFFF) - 1)) % _ADLER_BASE
    return (high << 16) | low


def _chunk(kind: bytes, data) -> bytes:
    return b"".join([struct.pack(">I", len(data)), kind, data, struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))])
