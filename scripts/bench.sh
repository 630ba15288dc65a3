#!/usr/bin/env bash
# `make bench`: the figures of BENCHMARKS.md, each measured in this run on the same weights and
# inputs. Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-fmnist32-deblur}
ONNX=models/zoo/$MODEL/model.onnx
CKPT=${CKPT:-models/zoo/$MODEL/model.onnx}   # tch reads the same weights from the ONNX model
ITEMS=${ITEMS:-"1 2 3 4 5 6 7 8"}                       # which figures of BENCHMARKS.md to make
on() { [[ " $ITEMS " == *" $1 "* ]]; }
W=out/bench
mkdir -p "$W"
[ -f "$ONNX" ] || { echo "bench: $ONNX missing (make zoo)"; exit 2; }
DAVI=target/release/davi
TRAIN=target/release/davi-train
# Inputs: 2,000 (and 10,000 for memory) measurements made from test images.
if [ ! -d "$W/in2000" ]; then
  $TRAIN images --config "models/configs/$MODEL.yaml" --split test -n 2000 -o "$W/clean2000"
  $DAVI degrade -m "$ONNX" -i "$W/clean2000" -o "$W/in2000" --seed 0
  mkdir -p "$W/in100" && cp $(ls -d "$W"/in2000/* | head -100) "$W/in100/"
  mkdir -p "$W/in10000" && for k in 0 1 2 3 4; do mkdir -p "$W/in10000/$k" && cp "$W"/in2000/* "$W/in10000/$k/"; done
fi
if on 1 || on 5; then
  echo "## 1. ONNX Runtime session vs tch eager (same weights, CPU, $(nproc) cores)"
  $DAVI bench -m "$ONNX" --batch 1,8,32 --seconds 5 --json "$W/ort.json"
  $TRAIN bench --checkpoint "$CKPT" --config "models/configs/$MODEL.yaml" --batch 1,8,32 --seconds 5 --peak | tee "$W/tch.txt"
  echo
fi
if on 2; then
  echo "## 2. davi restore end to end over 2,000 images vs the bare session"
  $DAVI bench -m "$ONNX" --batch 32 --seconds 5 -i "$W/in2000" --restore-batch 32 --json "$W/restore.json"
  echo
fi
if on 3; then
  echo "## 3. davi restore vs a Python script (onnxruntime + Pillow + numpy)"
  if [ ! -x .deps/bench-venv/bin/python ]; then
    python3 -m venv .deps/bench-venv
    .deps/bench-venv/bin/pip install --quiet onnxruntime==1.31.1 pillow numpy
  fi
  rm -rf "$W/py1" "$W/py32"
  .deps/bench-venv/bin/python scripts/bench/python_restore.py "$ONNX" "$W/in2000" "$W/py1" --batch 1
  .deps/bench-venv/bin/python scripts/bench/python_restore.py "$ONNX" "$W/in2000" "$W/py32" --batch 32
  echo
fi
if on 4; then
  echo "## 4. DAVI (one evaluation) vs DPS (1000 steps) per image, same prior, same test images"
  # `davi-train eval` times both on tch: DAVI on 64 images, DPS on the first 2 (about 30 s each here).
  $TRAIN eval --checkpoint "$CKPT" --config "models/configs/$MODEL.yaml" -n 64 --dps-n 2 --dps-steps 1000 \
    --samples 0 --device cpu -o "$W/dps" | grep -E "^\| (DAVI|DPS)"
  echo
fi
if on 5; then
  echo "## 5. the session's achieved GFLOP/s vs the machine's measured convolution peak"
  python3 - "$W/ort.json" "$W/tch.txt" <<'PY'
import json, re, sys
best = max(r["images_per_second"] for r in json.load(open(sys.argv[1]))["session"])
txt = open(sys.argv[2]).read()
conv, mm = map(float, re.search(r"model: ([\d.]+) GFLOP per image in convolutions, ([\d.]+)", txt).groups())
peak = max(float(g) for g in re.findall(r"peak: .*: ([\d.]+) GFLOP/s", txt))
print(f"session: {best:.1f} images/s x {conv:.4f} conv GFLOP/image = {best * conv:.1f} conv GFLOP/s "
      f"({best * (conv + mm):.1f} with matrix products); peak {peak:.1f} GFLOP/s: "
      f"{100 * best * conv / peak:.0f}% of peak ({100 * best * (conv + mm) / peak:.0f}% with matrix products)")
PY
  echo
fi
if on 6; then
  echo "## 6. peak RSS of davi restore over 100 and 10,000 images"
  command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time; }
  for n in 100 10000; do
    rm -rf "$W/rss$n"
    /usr/bin/time -f "restore $n images: peak RSS %M KiB, %e s" $DAVI restore -m "$ONNX" -i "$W/in$n" -o "$W/rss$n" 2>&1 | grep -E "peak RSS"
  done
  echo
fi
if on 7; then
  echo "## 7. a davi-train prior training step vs PyTorch eager (same UNet, batch 64, same threads)"
  # A bench-only venv with the full PyPI torch 2.11.0 (the same version as the libtorch of davi-train).
  if ! .deps/bench-torch/bin/python -c "import torch, yaml, safetensors" 2>/dev/null; then
    python3 -m venv .deps/bench-torch
    .deps/bench-torch/bin/pip install --quiet torch==2.11.0 numpy pyyaml safetensors
  fi
  PRIOR=models/configs/fmnist32-prior.yaml
  $TRAIN bench-train --config $PRIOR --batch 64 --seconds 30 --fixture "$W/train-fixture.safetensors"
  .deps/bench-torch/bin/python scripts/bench/torch_train_step.py $PRIOR "$W/train-fixture.safetensors" --batch 64 --seconds 30
fi
if on 8; then
  echo "## 8. tiled restoration: one 2048x2048 photograph-like image and one of 100 megapixels"
  PY=.deps/test-venv/bin/python3
  mkdir -p "$W/large2k" "$W/large100"
  [ -f "$W/large2k/a.png" ] || $PY scripts/bench/large_png.py "$W/large2k/a.png" 2048 2048
  [ -f "$W/large100/a.png" ] || $PY scripts/bench/large_png.py "$W/large100/a.png" 10000 10000
  DEN=models/zoo/fmnist32-denoise/model.onnx
  # Tiles/s and MP/s end to end against the bare session at the same batch, in one run.
  $DAVI bench -m "$DEN" --batch 64 --seconds 5 -i "$W/large2k" --restore-batch 64 --json "$W/tiles2k.json"
  # 100 MP streamed through the tiler: wall time and peak memory.
  rm -rf "$W/large100-out"
  /usr/bin/time -v $DAVI restore -m "$DEN" -i "$W/large100" -o "$W/large100-out" --batch 64 2> "$W/large100.time"
  grep -E "Maximum resident|Elapsed" "$W/large100.time"
  echo
fi

