#!/usr/bin/env bash
# `make zoo`: retrains every shipped Fashion-MNIST model from its committed config (the prior, then
# the four DAVI task models from it), exports each to models/zoo/<name>/ with its parity fixtures,
# and evaluates it (DAVI vs DPS vs the lifted measurement) into its card.yaml.
#   DEVICE=auto|cpu|cuda   where to train (default auto)     STAGE=train|export|all (default all)
#   DPS_STEPS, DPS_N, EVAL_N  evaluation sizes (defaults 1000, 16, 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release
DEVICE=${DEVICE:-auto}
STAGE=${STAGE:-all}
TASKS=${TASKS:-"deblur sr4 inpaint denoise"}
RUNS=${RUNS:-runs}
if [ "$STAGE" != export ]; then
  $BIN/davi-train prior --config models/configs/fmnist32-prior.yaml --device "$DEVICE" --run "$RUNS/fmnist32-prior"
  mkdir -p models/zoo/fmnist32-prior
  cp "$RUNS/fmnist32-prior/ema.safetensors" "$RUNS/fmnist32-prior/samples.png" models/zoo/fmnist32-prior/
  for t in $TASKS; do
    $BIN/davi-train davi --config "models/configs/fmnist32-$t.yaml" --device "$DEVICE" --run "$RUNS/fmnist32-$t"
  done
fi
[ "$STAGE" = train ] && exit 0
for t in $TASKS; do
  name=fmnist32-$t
  dir=models/zoo/$name
  mkdir -p "$dir"
  $BIN/davi-train export --checkpoint "$RUNS/$name/ema.safetensors" --config "models/configs/$name.yaml" -o "$dir/model.onnx"
  $BIN/davi-train eval --checkpoint "$RUNS/$name/ema.safetensors" --config "models/configs/$name.yaml" \
    -n "${EVAL_N:-1000}" --dps-steps "${DPS_STEPS:-1000}" --dps-n "${DPS_N:-16}" --device "$DEVICE" \
    -o "$RUNS/$name/eval" --card "$dir/card.yaml"
  cp "$RUNS/$name/eval/sheet.png" "$dir/sheet.png"
done
