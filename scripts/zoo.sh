#!/usr/bin/env bash
# `make zoo`: retrains every shipped model from its committed config and benchmarks it fairly:
#   1. the priors (fmnist32-prior, photo32-prior), their EMA weights shipped in fp16;
#   2. the DAVI task models from them (each config's `teacher` is its prior's zoo checkpoint), and
#      the supervised control of each Fashion-MNIST task (`davi-train davi --supervised`: the same
#      network, pairs, steps and seed, plain MSE);
#   3. export of each to models/zoo/<name>/ (weights once, fp16, inside model.onnx) with parity
#      fixtures, its validation curve beside it;
#   4. DPS's step size tuned on validation images (`davi-train tune-dps`, into the card);
#   5. `davi-train eval` into the card: DAVI and the lifted measurement on EVAL_N test images,
#      DDRM (20 steps) on the same, the supervised control on the same measurements and noise, DPS
#      with the tuned step on the first DPS_N, every method also on those (paired), FID/KID on the
#      Fashion-MNIST classifier's features, the spread of 8 DAVI posterior samples of 64 of them; and for photo models the whole held-out photographs
#      restored tile by tile (scripts/photo-eval.sh).
# Every training resumes from its run folder, so the script can be stopped and rerun.
#   DEVICE=auto|cpu|cuda   where to train (default auto)
#   STAGE=train|export|tune|eval|all (default all; eval includes the photo evaluation)
#   PRIORS, MODELS          which priors / task models (default: all of them; PRIORS="" none)
#   CONTROLS                task models that get a supervised control (default: the fmnist32 ones)
#   RUNS                    run folders (default runs/)
#   BIN                     the built binaries (default target/release)
#   EVAL_N, DPS_N, DPS_STEPS, TUNE_N   evaluation sizes (defaults 1000, 64, 1000, 16)
#   ZETAS                   DPS's step-size grid, refined around its best (default 0.03,0.1,0.3,1,3)
#   TUNE_ARGS               more tune-dps flags (e.g. --no-refine)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
DEVICE=${DEVICE:-auto}
STAGE=${STAGE:-all}
PRIORS=${PRIORS-"fmnist32-prior photo32-prior"}
MODELS=${MODELS:-"fmnist32-deblur fmnist32-sr4 fmnist32-inpaint fmnist32-denoise photo32-colorize photo32-denoise photo32-sr4 photo32-deblur"}
CONTROLS=${CONTROLS-"fmnist32-deblur fmnist32-sr4 fmnist32-inpaint fmnist32-denoise"}
RUNS=${RUNS:-runs}
stage() { [ "$STAGE" = all ] || [ "$STAGE" = "$1" ]; }
has_control() { [[ " $CONTROLS " == *" $1 "* ]]; }
if stage train; then
  for p in $PRIORS; do
    $BIN/davi-train prior --config "models/configs/$p.yaml" --device "$DEVICE" --run "$RUNS/$p"
    mkdir -p "models/zoo/$p"
    $BIN/davi-train import --half "$RUNS/$p/ema.safetensors" -o "models/zoo/$p/ema.safetensors"
    cp "$RUNS/$p/samples.png" "models/zoo/$p/"
  done
  for name in $MODELS; do
    $BIN/davi-train davi --config "models/configs/$name.yaml" --device "$DEVICE" --run "$RUNS/$name"
    if has_control "$name"; then
      $BIN/davi-train davi --supervised --config "models/configs/$name.yaml" --device "$DEVICE" \
        --run "$RUNS/$name-supervised"
    fi
  done
fi
if stage export; then
  for name in $MODELS; do
    dir=models/zoo/$name
    mkdir -p "$dir"
    $BIN/davi-train export --half-weights --checkpoint "$RUNS/$name/ema.safetensors" \
      --config "models/configs/$name.yaml" -o "$dir/model.onnx"
    # Validation PSNR every 500 steps and its curve, when the run validated.
    for f in validation.csv validation.png; do
      if [ -f "$RUNS/$name/$f" ]; then cp "$RUNS/$name/$f" "$dir/$f"; fi
    done
  done
fi
if stage tune; then
  for name in $MODELS; do
    $BIN/davi-train tune-dps --config "models/configs/$name.yaml" --card "models/zoo/$name/card.yaml" \
      -n "${TUNE_N:-16}" --zeta "${ZETAS:-0.03,0.1,0.3,1,3}" --dps-steps "${DPS_STEPS:-1000}" --device "$DEVICE" ${TUNE_ARGS:-}
  done
fi
if stage eval; then
  for name in $MODELS; do
    dir=models/zoo/$name
    extra=()
    case $name in fmnist32-*) extra+=(--features models/zoo/fmnist-classifier/weights.safetensors) ;; esac
    if has_control "$name" && [ -f "$RUNS/$name-supervised/ema.safetensors" ]; then
      extra+=(--supervised "$RUNS/$name-supervised/ema.safetensors")
    fi
    # The weights as shipped (fp16, read back from model.onnx); the run gives steps and time.
    $BIN/davi-train eval --checkpoint "$dir/model.onnx" --config "models/configs/$name.yaml" \
      "${extra[@]}" -n "${EVAL_N:-1000}" --dps-steps "${DPS_STEPS:-1000}" --dps-n "${DPS_N:-64}" --samples 8 \
      --device "$DEVICE" -o "$RUNS/$name/eval" --card "$dir/card.yaml" --trained-in "$RUNS/$name"
    cp "$RUNS/$name/eval/sheet.png" "$dir/sheet.png"
    case $name in photo32-*) BIN=$BIN scripts/photo-eval.sh "$name" "$RUNS/$name/photo-eval" ;; esac
  done
fi
