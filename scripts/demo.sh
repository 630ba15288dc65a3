#!/usr/bin/env bash
# `make demo`: restores the held-out samples of every shipped model (models/zoo/<task>/) with
# `davi` (ONNX Runtime, no libtorch) into out/<task>/, writes a contact sheet per task and prints
# PSNR against the clean images. Until trained models ship, it first builds the smallest model
# the tests make (tiny-deblur, which needs libtorch) and runs that.
set -euo pipefail
cd "$(dirname "$0")/.."
DAVI=target/release/davi
mkdir -p out
scripts/setup --runtime-only
cargo build --release -p davi-runtime
tasks=()
for d in models/zoo/*/; do
  [ -f "$d/model.onnx" ] && [ -d "models/samples/$(basename "$d")" ] && tasks+=("$(basename "$d")")
done
if [ ${#tasks[@]} -eq 0 ]; then
  echo "demo: no trained model ships yet; making the tests' tiny model (untrained beyond a few steps: expect poor restorations)"
  scripts/setup
  cargo build --release --workspace
  scripts/parity.sh out/tiny
  mkdir -p models/zoo.local/tiny-deblur out/samples/tiny-deblur
  cp out/tiny/model/model.onnx out/tiny/model/model.parity.safetensors models/zoo.local/tiny-deblur/
  target/release/davi-train images --config tests/configs/tiny-deblur.yaml --split test -n 32 -o out/samples/tiny-deblur/clean
  $DAVI degrade -m models/zoo.local/tiny-deblur/model.onnx -i out/samples/tiny-deblur/clean -o out/samples/tiny-deblur/degraded --seed 0
  zoo=models/zoo.local; samples=out/samples; tasks=(tiny-deblur)
else
  zoo=models/zoo; samples=models/samples
fi
printf '\n| model | images | PSNR restored (dB) | PSNR measurement (dB) | SSIM restored |\n|---|---:|---:|---:|---:|\n' > out/demo.md
for t in "${tasks[@]}"; do
  echo "demo: restoring $samples/$t/degraded with $zoo/$t/model.onnx"
  $DAVI restore -m "$zoo/$t/model.onnx" -i "$samples/$t/degraded" -o "out/$t" --seed 0 --report "out/$t.report.json"
  $DAVI eval --restored "out/$t" --reference "$samples/$t/clean" --json "out/$t.eval.json" \
    --sheet "out/$t.sheet.png" --measurement "$samples/$t/degraded" > /dev/null
  # The measurement's own PSNR where it has the image's size (not for SR or colorization).
  mpsnr=$($DAVI eval --restored "$samples/$t/degraded" --reference "$samples/$t/clean" --json "out/$t.measurement.json" >/dev/null 2>&1 \
    && python3 -c "import json;print('%.2f' % json.load(open('out/$t.measurement.json'))['psnr'])" || echo "n/a")
  python3 - "$t" "out/$t.eval.json" "$mpsnr" >> out/demo.md <<'PY'
import json, sys
t, path, m = sys.argv[1:]
e = json.load(open(path))
print(f"| {t} | {len(e['images'])} | {e['psnr']:.2f} ± {e['psnr_ci95']:.2f} | {m} | {e['ssim']:.4f} |")
PY
done
# Whole photographs, larger than the model, restored tile by tile: the photographs in
# models/samples/photo/ (held out from every photo model's training) through every photo model.
if [ "$zoo" = models/zoo ] && [ -d models/samples/photo ]; then
  photo=models/samples/photo
  for m in "$zoo"/photo32-*/model.onnx; do
    [ -f "$m" ] || continue
    t=$(basename "$(dirname "$m")")
    echo "demo: $t on the whole photograph(s) in $photo, tile by tile"
    rm -rf "out/photo/$t"
    # A model whose operator is not local (fixed-box inpainting) refuses other sizes: say so, go on.
    if ! $DAVI degrade -m "$m" -i "$photo" -o "out/photo/$t/measured" --lift "out/photo/$t/lifted" --seed 0 ||
       ! $DAVI restore -m "$m" -i "out/photo/$t/measured" -o "out/photo/$t/restored" --seed 0; then
      echo "demo: $t does not restore whole photographs (see the message above); skipped"
      continue
    fi
    $DAVI eval --restored "out/photo/$t/restored" --reference "$photo" --json "out/photo/$t/eval.json" \
      --sheet "out/photo/$t.sheet.png" --measurement "out/photo/$t/lifted" > /dev/null
    $DAVI eval --restored "out/photo/$t/lifted" --reference "$photo" --json "out/photo/$t/lifted.json" > /dev/null
    python3 - "$t" "out/photo/$t/eval.json" "out/photo/$t/lifted.json" >> out/demo.md <<'PY'
import json, sys
t, e, g = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
print(f"| {t}, whole photograph (in tiles) | {len(e['images'])} | {e['psnr']:.2f} | {g['psnr']:.2f} (lifted) | {e['ssim']:.4f} |")
PY
  done
fi
cat out/demo.md
echo
echo "demo: restored images in out/<model>/, contact sheets out/<model>.sheet.png (measurement | restored | clean);"
echo "demo: whole photographs in out/photo/<model>/, their sheets out/photo/<model>.sheet.png"
