"""Reading a PNG file's header for tests: signature, IHDR (with its CRC) and the IEND chunk."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of a well-formed PNG; AssertionError naming what is wrong if not."""
    data = Path(path).read_bytes()
    assert data[:8] == SIGNATURE, f"{path}: not a PNG signature: {data[:8]!r}"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13, f"{path}: first chunk is {kind!r}, not IHDR"
    body = data[16:16 + length]
    (crc,) = struct.unpack(">I", data[16 + length:20 + length])
    assert zlib.crc32(kind + body) == crc, f"{path}: IHDR CRC mismatch"
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82", f"{path}: does not end with IEND"
    width, height = struct.unpack(">II", body[:8])
    return width, height
