#!/usr/bin/env bash
# Trains the Fashion-MNIST zoo (four DAVI task models and their supervised controls from the
# shipped prior, `scripts/zoo.sh STAGE=train`) on a
# GPU machine with torch 2.11.0+cu130 at /opt/torch/.venv and no Rust or network.
# Here:   scripts/gpu/zoo.sh --prepare   copies davi-train and the Fashion-MNIST IDX files to out/gpu-zoo
#                                        (carry out/gpu-zoo)
# There:  scripts/gpu/zoo.sh OUT_DIR     trains, and copies the EMA weights, sample grid and a tar of
#                                        the run folders' metrics to OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "--prepare" ]; then
  cargo build --release -p davi-train
  rm -rf out/gpu-zoo && mkdir -p out/gpu-zoo
  cp target/release/davi-train /usr/share/datasets/fashion-mnist/*-images-idx3-ubyte.gz out/gpu-zoo/
  exit 0
fi
OUT=${1:?usage: scripts/gpu/zoo.sh OUT_DIR}
mkdir -p "$OUT" /usr/share/datasets/fashion-mnist target/release
cp out/gpu-zoo/*.gz /usr/share/datasets/fashion-mnist/
cp out/gpu-zoo/davi-train target/release/
SITE=$(ls -d /opt/torch/.venv/lib/python3*/site-packages)
export LIBTORCH="$SITE/torch"
LD_LIBRARY_PATH="$SITE/torch/lib"
for d in "$SITE"/nvidia/*/lib; do LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"; done
export LD_LIBRARY_PATH
RUNS=/tmp/runs
save() {
  cp "$RUNS/fmnist32-prior/ema.safetensors" "$OUT/fmnist32-prior.ema.safetensors" 2>/dev/null || true
  cp "$RUNS/fmnist32-prior/samples.png" "$OUT/fmnist32-prior.samples.png" 2>/dev/null || true
  for r in "$RUNS"/fmnist32-*/; do
    n=$(basename "$r")
    [ "$n" != fmnist32-prior ] && [ -f "$r/ema.safetensors" ] && cp "$r/ema.safetensors" "$OUT/$n.ema.safetensors"
  done
  tar czf "$OUT/runs.tgz" -C "$RUNS" --exclude='ckpt-*' --exclude='ema.safetensors' . 2>/dev/null || true
}
trap save EXIT
# The shipped fmnist32-prior is every task's teacher (PRIORS=fmnist32-prior retrains it too).
time timeout "${LIMIT:-530}" env DEVICE=cuda STAGE=train RUNS=$RUNS PRIORS="${PRIORS-}" \
  MODELS="fmnist32-deblur fmnist32-sr4 fmnist32-inpaint fmnist32-denoise" scripts/zoo.sh 2>&1 | grep -v "^\s*$" | tail -20 || echo "gpu-zoo: stopped by the time limit; the finished parts are saved"
