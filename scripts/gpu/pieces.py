#!/usr/bin/env python3
"""Ships large files to the GPU machine in pieces that each fit beside the working tree.

    pieces.py split --max-mib N --out DIR FILE...   (here)   xz-compress each FILE, cut the
        streams into parts, pack the parts into DIR/00, DIR/01, ... of at most N MiB each, every
        piece folder with the same manifest.json (sha256 of each part and of each original file).
    pieces.py join DIR DEST                         (there)  check every part against the manifest,
        reassemble, decompress, check each file's sha256, write it into DEST atomically.

Standard library only (the GPU machine has Python but no network and nothing installed).
A missing, truncated or altered piece is refused with its name; nothing half-written is left.
"""
import argparse
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile

MANIFEST = "manifest.json"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def compress(src, dst):
    """xz at preset 6: the xz tool with all cores where it exists, else Python's lzma."""
    if shutil.which("xz"):
        with open(dst, "wb") as out:
            subprocess.run(["xz", "-6", "-T0", "-c", src], stdout=out, check=True)
    else:
        with open(src, "rb") as f, lzma.open(dst, "wb", preset=6) as out:
            shutil.copyfileobj(f, out, 1 << 20)


def split(args):
    budget = int(args.max_mib * (1 << 20))
    if budget < (1 << 20):
        sys.exit("pieces: --max-mib must leave at least 1 MiB per piece")
    if os.path.exists(args.out) and os.listdir(args.out):
        sys.exit(f"pieces: {args.out} is not empty; give a new folder")
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="pieces-")
    files, parts = [], []  # parts: (file index, part index, bytes path, size)
    try:
        for i, path in enumerate(args.files):
            name = os.path.basename(path)
            if any(f["name"] == name for f in files):
                sys.exit(f"pieces: two files named {name}")
            xz = os.path.join(work, name + ".xz")
            compress(path, xz)
            entry = {
                "name": name,
                "size": os.path.getsize(path),
                "sha256": sha256_file(path),
                "mode": os.stat(path).st_mode & 0o777,
                "xz_size": os.path.getsize(xz),
                "parts": [],
            }
            with open(xz, "rb") as f:
                k = 0
                while True:
                    chunk = f.read(budget)
                    if not chunk:
                        break
                    p = os.path.join(work, f"{name}.xz.part{k:03d}")
                    with open(p, "wb") as o:
                        o.write(chunk)
                    parts.append((i, k, p, len(chunk)))
                    k += 1
            files.append(entry)
            print(f"pieces: {name}: {entry['size'] / 1e6:.1f} MB -> {entry['xz_size'] / 1e6:.1f} MB xz, {k} parts")
        # Pack parts into pieces, first fit by decreasing size.
        bins = []  # [used bytes, [parts]]
        for part in sorted(parts, key=lambda p: -p[3]):
            for b in bins:
                if b[0] + part[3] <= budget:
                    b[0] += part[3]
                    b[1].append(part)
                    break
            else:
                bins.append([part[3], [part]])
        for n, (_, members) in enumerate(bins):
            for i, k, p, size in members:
                files[i]["parts"].append(
                    {"piece": f"{n:02d}", "file": os.path.basename(p), "size": size, "sha256": sha256_file(p), "index": k}
                )
        for f in files:
            f["parts"].sort(key=lambda p: p["index"])
        manifest = json.dumps({"pieces": len(bins), "files": files}, indent=1, sort_keys=True)
        for n, (_, members) in enumerate(bins):
            d = os.path.join(args.out, f"{n:02d}")
            os.makedirs(d)
            for _, _, p, _ in members:
                shutil.move(p, os.path.join(d, os.path.basename(p)))
            with open(os.path.join(d, MANIFEST), "w") as o:
                o.write(manifest)
            used = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))
            print(f"pieces: {d}: {used / (1 << 20):.1f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"pieces: {len(bins)} pieces of at most {args.max_mib} MiB in {args.out}")


def join(args):
    pieces = sorted(d for d in os.listdir(args.dir) if os.path.isfile(os.path.join(args.dir, d, MANIFEST)))
    if not pieces:
        sys.exit(f"pieces: no piece folder with a {MANIFEST} in {args.dir}")
    with open(os.path.join(args.dir, pieces[0], MANIFEST)) as f:
        manifest = json.load(f)
    for p in pieces[1:]:
        with open(os.path.join(args.dir, p, MANIFEST)) as f:
            if json.load(f) != manifest:
                sys.exit(f"pieces: {args.dir}/{p} belongs to another split (its manifest differs)")
    missing = sorted({part["piece"] for f in manifest["files"] for part in f["parts"]} - set(pieces))
    if missing:
        sys.exit(f"pieces: missing piece folders {', '.join(missing)} of {manifest['pieces']} in {args.dir}")
    os.makedirs(args.dest, exist_ok=True)
    for f in manifest["files"]:
        target = os.path.join(args.dest, f["name"])
        if os.path.isfile(target) and sha256_file(target) == f["sha256"]:
            print(f"pieces: {f['name']} already in place")
            continue
        tmp_xz = tempfile.NamedTemporaryFile(dir=args.dest, prefix=f".{f['name']}.", suffix=".xz.tmp", delete=False)
        tmp_out = target + ".tmp"
        try:
            with tmp_xz as o:
                for part in f["parts"]:
                    p = os.path.join(args.dir, part["piece"], part["file"])
                    if not os.path.isfile(p):
                        sys.exit(f"pieces: {p} is missing")
                    got = sha256_file(p)
                    if got != part["sha256"] or os.path.getsize(p) != part["size"]:
                        sys.exit(f"pieces: {p} is damaged: sha256 {got}, the manifest says {part['sha256']}")
                    with open(p, "rb") as src:
                        shutil.copyfileobj(src, o, 1 << 20)
            with lzma.open(tmp_xz.name, "rb") as src, open(tmp_out, "wb") as o:
                shutil.copyfileobj(src, o, 1 << 20)
            got = sha256_file(tmp_out)
            if got != f["sha256"]:
                sys.exit(f"pieces: {f['name']} reassembled with sha256 {got}, the manifest says {f['sha256']}")
            os.chmod(tmp_out, f["mode"])
            os.replace(tmp_out, target)
            print(f"pieces: {f['name']} ({f['size'] / 1e6:.1f} MB) reassembled, sha256 ok")
        finally:
            for p in (tmp_xz.name, tmp_out):
                if os.path.exists(p):
                    os.remove(p)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("--max-mib", type=float, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("files", nargs="+")
    j = sub.add_parser("join")
    j.add_argument("dir")
    j.add_argument("dest")
    args = ap.parse_args()
    split(args) if args.cmd == "split" else join(args)


if __name__ == "__main__":
    main()
