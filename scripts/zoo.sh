#!/usr/bin/env bash
# `make zoo`: retrains every shipped model from its committed config: the two priors
# (fmnist32-prior, photo32-prior), then the DAVI task models from them (their configs' `teacher`
# is the prior's zoo checkpoint), exports each to models/zoo/<name>/ with its parity fixtures (the
# weights stored once, in fp16, inside model.onnx), and evaluates that model (DAVI vs DPS vs the
# lifted measurement) into its card.yaml. The priors ship their EMA weights in fp16 too; the run
# folders keep every checkpoint in f32.
#   DEVICE=auto|cpu|cuda   where to train (default auto)     STAGE=train|export|all (default all)
#   PRIORS, MODELS          which priors / task models (default: all of them)
#   RUNS                    run folders (default runs/)
#   DPS_STEPS, DPS_N, EVAL_N  evaluation sizes (defaults 1000, 16, 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release
DEVICE=${DEVICE:-auto}
STAGE=${STAGE:-all}
PRIORS=${PRIORS:-"fmnist32-prior photo32-prior"}
MODELS=${MODELS:-"fmnist32-deblur fmnist32-sr4 fmnist32-inpaint fmnist32-denoise photo32-colorize"}
RUNS=${RUNS:-runs}
if [ "$STAGE" != export ]; then
  for p in $PRIORS; do
    $BIN/davi-train prior --config "models/configs/$p.yaml" --device "$DEVICE" --run "$RUNS/$p"
    mkdir -p "models/zoo/$p"
    $BIN/davi-train import --half "$RUNS/$p/ema.safetensors" -o "models/zoo/$p/ema.safetensors"
    cp "$RUNS/$p/samples.png" "models/zoo/$p/"
  done
  for name in $MODELS; do
    $BIN/davi-train davi --config "models/configs/$name.yaml" --device "$DEVICE" --run "$RUNS/$name"
  done
fi
[ "$STAGE" = train ] && exit 0
for name in $MODELS; do
  dir=models/zoo/$name
  mkdir -p "$dir"
  $BIN/davi-train export --half-weights --checkpoint "$RUNS/$name/ema.safetensors" \
    --config "models/configs/$name.yaml" -o "$dir/model.onnx"
  features=()
  case $name in fmnist32-*) features=(--features models/zoo/fmnist-classifier/weights.safetensors) ;; esac
  $BIN/davi-train eval --checkpoint "$dir/model.onnx" --config "models/configs/$name.yaml" "${features[@]}" \
    -n "${EVAL_N:-1000}" --dps-steps "${DPS_STEPS:-1000}" --dps-n "${DPS_N:-16}" --device "$DEVICE" \
    -o "$RUNS/$name/eval" --card "$dir/card.yaml"
  cp "$RUNS/$name/eval/sheet.png" "$dir/sheet.png"
  # Validation PSNR every 500 steps and its curve, when the run validated.
  for f in validation.csv validation.png; do
    [ -f "$RUNS/$name/$f" ] && cp "$RUNS/$name/$f" "$dir/$f"
  done
done
