"""Prints the Markdown table of every model card's `eval:` section (models/zoo/*/card.yaml).

The cards are written by `davi-train eval --card`; this only formats them (no YAML library
needed: the cards' layout is fixed).
"""
import glob
import re
import sys


def rows(path):
    text = open(path).read()
    name = re.search(r"^name: (.+)$", text, re.M).group(1)
    m = re.search(r"^eval:\n((?:  .*\n?)*)", text, re.M)
    if not m:
        return None
    ev = m.group(1)
    n = re.search(r"^  n: (\d+)", ev, re.M).group(1)
    out = {}
    for method in ("lifted", "davi", "dps"):
        block = re.search(rf"^  {method}:\n((?:    .*\n?)*)", ev, re.M).group(1)
        vals = dict(re.findall(r"^    (\w+): (.+)$", block, re.M))
        out[method] = vals
    return name, n, out


def fmt(v, spec):
    try:
        x = float(v)
    except ValueError:
        return v
    return "n/a" if x != x else format(x, spec)


def main():
    print("| model | method | PSNR (dB) | SSIM | network evaluations | seconds / image (2 CPU cores) |")
    print("|---|---|---:|---:|---:|---:|")
    for card in sorted(glob.glob("models/zoo/*/card.yaml")):
        r = rows(card)
        if r is None:
            continue
        name, n, ev = r
        for method, label in (("lifted", "lifted measurement"), ("davi", "**DAVI**"), ("dps", "DPS")):
            v = ev[method]
            print(f"| {name} | {label} | {fmt(v['psnr'], '.2f')} | {fmt(v['ssim'], '.4f')} | {v['nfe']} | {fmt(v['seconds_per_image'], '.4f')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
