"""Prints the Markdown table of every model card's `eval:` section (models/zoo/*/card.yaml).

The cards are written by `davi-train eval --card`; this only formats them (no YAML library
needed: the cards' layout is fixed).
"""
import glob
import re
import sys


METHODS = ("lifted", "davi", "dps", "ddrm", "supervised")
LABELS = {
    "lifted": "lifted measurement",
    "davi": "**DAVI**",
    "dps": "DPS",
    "ddrm": "DDRM",
    "supervised": "supervised control",
}


def rows(path):
    text = open(path).read()
    name = re.search(r"^name: (.+)$", text, re.M).group(1)
    m = re.search(r"^eval:\n((?:  .*\n?)*)", text, re.M)
    if not m:
        return None
    ev = m.group(1)
    n = re.search(r"^  n: (\d+)", ev, re.M).group(1)
    out = {}
    for method in METHODS:
        block = re.search(rf"^  {method}:\n((?:    .*\n?)*)", ev, re.M)
        if block is None:
            continue  # a method this card's evaluation did not run
        vals = dict(re.findall(r"^    (\w+): (.+)$", block.group(1), re.M))
        vals.setdefault("n", n if method != "dps" else "")
        out[method] = vals
    # Every method on the same images, when the card has it (`eval.paired`).
    p = re.search(r"^  paired:\n((?:    .*\n?)*)", ev, re.M)
    if p:
        for method in METHODS:
            block = re.search(rf"^    {method}:\n((?:      .*\n?)*)", p.group(1), re.M)
            if block is not None:
                out["paired " + method] = dict(re.findall(r"^      (\w+): (.+)$", block.group(1), re.M))
    return name, n, out


def fmt(v, spec):
    try:
        x = float(v)
    except ValueError:
        return v
    return "n/a" if x != x else format(x, spec)


def pm(v, key, spec):
    """The mean, with its 95% interval where the card has one."""
    ci = v.get(key + "_ci95")
    return fmt(v[key], spec) + (f" ± {fmt(ci, spec)}" if ci else "")


def main():
    print("| model | method | images | PSNR (dB) | SSIM | FID / KID | network evaluations | seconds / image (2 CPU cores) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for card in sorted(glob.glob("models/zoo/*/card.yaml")):
        r = rows(card)
        if r is None:
            continue
        name, n, ev = r
        labels = [(m, LABELS[m]) for m in METHODS if m in ev]
        labels += [("paired " + m, "paired: " + LABELS[m]) for m in METHODS if "paired " + m in ev]
        for method, label in labels:
            v = ev[method]
            perceptual = (f"FID {fmt(v['fid'], '.2f')}" if "fid" in v else "") + (f"KID {fmt(v['kid'], '.4f')}" if "kid" in v else "")
            print(f"| {name} | {label} | {v.get('n', '')} | {pm(v, 'psnr', '.2f')} | {pm(v, 'ssim', '.4f')} | {perceptual} | {v['nfe']} | {fmt(v['seconds_per_image'], '.4f')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
