"""What a user would write instead of `davi restore`: onnxruntime + Pillow + numpy.

python_restore.py MODEL IN_DIR OUT_DIR [--batch N]   (--batch 1: one image at a time)
Same model, same folder, same noise law (standard normal, its own generator), PNG out.
"""
import argparse
import os
import time

import numpy as np
import onnxruntime as ort
from PIL import Image


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("inp")
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    sess = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    c, s = int(meta["davi.channels"]), int(meta["davi.image_size"])
    files = sorted(
        os.path.join(r, f) for r, _, fs in os.walk(a.inp) for f in fs if f.lower().endswith((".png", ".jpg"))
    )
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(0, len(files), a.batch):
        chunk = files[i : i + a.batch]
        ys = []
        for f in chunk:
            img = Image.open(f).convert("L" if c == 1 else "RGB")
            x = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
            ys.append(x[None] if c == 1 else x.transpose(2, 0, 1))
        y = np.stack(ys)
        z = rng.standard_normal((len(chunk), c, s, s), dtype=np.float32)
        out = sess.run(["image"], {"measurement": y, "noise": z})[0]
        for f, o in zip(chunk, out):
            u8 = np.clip(np.rint((o + 1.0) * 127.5), 0, 255).astype(np.uint8)
            rel = os.path.relpath(f, a.inp)
            dst = os.path.join(a.out, os.path.splitext(rel)[0] + ".png")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            Image.fromarray(u8[0] if c == 1 else u8.transpose(1, 2, 0)).save(dst)
    dt = time.perf_counter() - t0
    print(f"python batch {a.batch}: {len(files)} images in {dt:.2f}s, {len(files) / dt:.1f} images/s")


if __name__ == "__main__":
    main()
