#!/usr/bin/env bash
# `make bench`: the figures of BENCHMARKS.md, each measured in this run on the same weights and
# inputs. Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-fmnist32-deblur}
ONNX=models/zoo/$MODEL/model.onnx
CKPT=${CKPT:-runs/$MODEL/ema.safetensors}
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
echo "## 1. ONNX Runtime session vs tch eager (same weights, CPU, $(nproc) cores)"
$DAVI bench -m "$ONNX" --batch 1,8,32 --seconds 5 --json "$W/ort.json"
if [ -f "$CKPT" ]; then $TRAIN bench --checkpoint "$CKPT" --config "models/configs/$MODEL.yaml" --batch 1,8,32 --seconds 5; else echo "(no $CKPT: tch figures need the training checkpoint)"; fi
echo
echo "## 2. davi restore end to end over 2,000 images vs the bare session"
$DAVI bench -m "$ONNX" --batch 32 --seconds 5 -i "$W/in2000" --restore-batch 32 --json "$W/restore.json"
echo
echo "## 3. davi restore vs a Python script (onnxruntime + Pillow + numpy)"
if [ ! -x .deps/bench-venv/bin/python ]; then
  python3 -m venv .deps/bench-venv
  .deps/bench-venv/bin/pip install --quiet onnxruntime==1.31.1 pillow numpy
fi
rm -rf "$W/py1" "$W/py32"
.deps/bench-venv/bin/python scripts/bench/python_restore.py "$ONNX" "$W/in2000" "$W/py1" --batch 1
.deps/bench-venv/bin/python scripts/bench/python_restore.py "$ONNX" "$W/in2000" "$W/py32" --batch 32
echo
echo "## 6. peak RSS of davi restore over 100 and 10,000 images"
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time; }
for n in 100 10000; do
  rm -rf "$W/rss$n"
  /usr/bin/time -f "restore $n images: peak RSS %M KiB, %e s" $DAVI restore -m "$ONNX" -i "$W/in$n" -o "$W/rss$n" 2>&1 | grep -E "peak RSS"
done
