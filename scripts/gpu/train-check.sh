#!/usr/bin/env bash
# CUDA check for a GPU machine (torch 2.11.0+cu130 at /opt/torch/.venv, no Rust, no network).
# Here:   scripts/gpu/train-check.sh --prepare    builds davi-train and writes 512 Fashion-MNIST test
#                                           images to out/gpu-check/data (carry target/release/davi-train
#                                           and out/gpu-check to the GPU machine)
# There:  scripts/gpu/train-check.sh [OUT_DIR]    points the carried binary at that torch's libraries, trains
#                                           the shipped prior config on CUDA and on the CPU, a few DAVI
#                                           steps on CUDA, and prints steps/s for each.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "--prepare" ]; then
  cargo build --release -p davi-train
  rm -rf out/gpu-check && mkdir -p out/gpu-check
  cp target/release/davi-train out/gpu-check/
  target/release/davi-train images --config models/configs/fmnist32-prior.yaml --split test -n 512 -o out/gpu-check/data
  exit 0
fi
OUT=${1:-out/gpu-check/result}
mkdir -p "$OUT"
BIN=out/gpu-check/davi-train
SITE=$(ls -d /opt/torch/.venv/lib/python3*/site-packages)
export LIBTORCH="$SITE/torch"
LD_LIBRARY_PATH="$SITE/torch/lib"
for d in "$SITE"/nvidia/*/lib "$SITE"/nvidia/cu13/lib; do [ -d "$d" ] && LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"; done
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# The prior config of the zoo, on the carried images.
sed -e '/^data:/,/^train:/{/^train:/!d}' models/configs/fmnist32-prior.yaml > "$OUT/prior.yaml"
sed -i "s|^train:|data:\n  kind: folder\n  dir: $(pwd)/out/gpu-check/data\ntrain:|" "$OUT/prior.yaml"
sed -e 's/^name: .*/name: gpu-deblur/' -e '/^data:/,$d' "$OUT/prior.yaml" > "$OUT/deblur.yaml"
cat >> "$OUT/deblur.yaml" <<YAML
task:
  operator: {task: deblur, kernel_size: 9, sigma: 1.5}
  sigma_y: 0.05
data:
  kind: folder
  dir: $(pwd)/out/gpu-check/data
train:
  davi: {batch_size: 32, steps: 100, checkpoint_every: 50, t_ikl: 400, weight_con: 0.5, reg_coeff: 0.25}
YAML
rate() { tail -1 "$1/metrics.csv" | awk -F, '{print $NF}'; }
echo "== an unavailable device is an error"
if $BIN prior --config "$OUT/prior.yaml" --device cuda:7 --run "$OUT/bad" --steps 1 2> "$OUT/bad.err"; then echo "FAIL: cuda:7 accepted"; else cat "$OUT/bad.err" | tail -1; fi
echo "== prior, CUDA, 300 steps"
$BIN prior --config "$OUT/prior.yaml" --device cuda --run "$OUT/prior-cuda" --steps 300 2>&1 | tail -2
echo "== prior, CPU ($(nproc) cores), 20 steps"
$BIN prior --config "$OUT/prior.yaml" --device cpu --run "$OUT/prior-cpu" --steps 20 2>&1 | tail -2
echo "== DAVI deblur, CUDA, 100 steps"
$BIN davi --config "$OUT/deblur.yaml" --device cuda --run "$OUT/davi-cuda" --teacher "$OUT/prior-cuda/ema.safetensors" 2>&1 | tail -2
echo "== DAVI eval on CUDA (DPS 100 steps on 8 images)"
$BIN eval --checkpoint "$OUT/davi-cuda/ema.safetensors" --config "$OUT/deblur.yaml" -n 256 --dps-steps 100 --dps-n 8 \
  --teacher "$OUT/prior-cuda/ema.safetensors" -o "$OUT/eval" --device cuda 2>&1 | tail -6
echo "== summary (batch 64 prior, batch 32 DAVI)"
echo "prior steps/s: cuda $(rate "$OUT/prior-cuda")  cpu $(rate "$OUT/prior-cpu")"
echo "davi  steps/s: cuda $(rate "$OUT/davi-cuda")"
