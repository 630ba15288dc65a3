#!/usr/bin/env bash
# The parity job: a tiny prior and a tiny DAVI model trained for a few steps, exported to ONNX,
# and `davi verify` on ONNX Runtime's CPU EP. Exit status is verify's.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/parity}
BIN=target/release
rm -rf "$OUT"
mkdir -p "$OUT"
echo "parity: training tiny-prior (6 steps)"
$BIN/davi-train prior --config tests/configs/tiny-prior.yaml --run "$OUT/prior" --device cpu
echo "parity: training tiny-deblur (4 DAVI steps)"
$BIN/davi-train davi --config tests/configs/tiny-deblur.yaml --run "$OUT/davi" --teacher "$OUT/prior/ema.safetensors" --device cpu
echo "parity: exporting"
# The run's own config.yaml: it names the teacher given on the command line.
$BIN/davi-train export --checkpoint "$OUT/davi/ema.safetensors" --config "$OUT/davi/config.yaml" -o "$OUT/model/model.onnx"
echo "parity: davi verify (CPU EP)"
$BIN/davi verify -m "$OUT/model/model.onnx"
