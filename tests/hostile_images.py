"""Files that real users and attackers send as images, written without decoding anything: a
small PNG of a huge grayscale image, a truncated PNG, a text file with an image's name."""

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def gray_png_bomb(path: Path, width: int = 20000, height: int = 20000) -> str:
    """A valid 8-bit grayscale PNG of ``width`` x ``height`` black pixels (20000x20000: 400 MB
    decoded, 1.2 GB as RGB) in a file of under 2 MB; compressed row block by row block, so
    writing it never holds the image."""
    row = b"\x00" * (width + 1)  # filter byte + pixels
    compressor = zlib.compressobj(1)
    rows_per_block = max(1, 8_000_000 // len(row))
    data = []
    for start in range(0, height, rows_per_block):
        data.append(compressor.compress(row * min(rows_per_block, height - start)))
    data.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(data))
        + _png_chunk(b"IEND", b"")
    )
    return str(path)


def truncated_png(path: Path, height: int = 128, width: int = 160) -> str:
    """The first half of a PNG of random pixels: the header is fine, the pixels end early."""
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    path.write_bytes(encoded.tobytes()[: len(encoded) // 2])
    return str(path)


def not_an_image(path: Path) -> str:
    """A text file with an image's name."""
    path.write_text("these are notes, not a picture\n")
    return str(path)
