"""Writes a large grey PNG with varied content (a photograph-like mix of smooth shading, edges
and fine texture), streaming rows so memory stays small whatever the size.

    python3 scripts/bench/large_png.py OUT.png WIDTH HEIGHT
"""
import struct
import sys
import zlib

import numpy as np


def chunk(f, kind, data):
    f.write(struct.pack(">I", len(data)) + kind + data)
    f.write(struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def main():
    out, w, h = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    x = np.arange(w, dtype=np.float64)
    rng = np.random.default_rng(0)
    comp = zlib.compressobj(6)
    with open(out + ".part", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        chunk(f, b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        pending = b""
        for y in range(h):
            v = (
                128
                + 60 * np.sin(x / 97.0 + y / 131.0)
                + 30 * np.sign(np.sin(x / 23.0) * np.sin(y / 29.0))
                + 12 * rng.standard_normal(w)
            )
            row = b"\x00" + np.clip(v, 0, 255).astype(np.uint8).tobytes()
            pending += comp.compress(row)
            if len(pending) > 1 << 20:
                chunk(f, b"IDAT", pending)
                pending = b""
        pending += comp.flush()
        chunk(f, b"IDAT", pending)
        chunk(f, b"IEND", b"")
    import os

    os.replace(out + ".part", out)


if __name__ == "__main__":
    main()
