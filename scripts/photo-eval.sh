#!/usr/bin/env bash
# Whole held-out photographs through a photo model, tile by tile (issue 17): the config's test
# photographs (no scene shared with training), downscaled as training sees them, are measured
# (`davi degrade`, which also writes the lifted measurement: bicubic upsampling for SR, the grey
# image in R, G and B for colorization), restored whole (`davi restore` tiles them), and scored
# against the truth for DAVI and for the lifted measurement (`davi eval`). Both rows go into the
# card's `whole_photos` table. It also writes the README's figure of the model (photo.jpg).
#   scripts/photo-eval.sh NAME [OUT]     NAME: photo32-denoise, photo32-sr4, photo32-deblur, ...
#   CARD=...   the card to write (default models/zoo/NAME/card.yaml)
#   BIN=...    the built binaries (default target/release)
#   FIGURE=... the sample photograph's sheet (default: photo.jpg beside the card)
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?usage: scripts/photo-eval.sh NAME [OUT]}
OUT=${2:-out/photo-eval/$NAME}
B=${BIN:-target/release}
M=models/zoo/$NAME/model.onnx
C=models/configs/$NAME.yaml
CARD=${CARD:-models/zoo/$NAME/card.yaml}
rm -rf "$OUT"
mkdir -p "$OUT"
$B/davi-train images --config "$C" --split test --whole -o "$OUT/truth"
$B/davi degrade -m "$M" -i "$OUT/truth" -o "$OUT/measured" --lift "$OUT/lifted"
$B/davi restore -m "$M" -i "$OUT/measured" -o "$OUT/restored"
$B/davi eval --restored "$OUT/restored" --reference "$OUT/truth" --card "$CARD" --method davi \
  --markdown "$OUT/davi.md" --sheet "$OUT/sheet.png" --measurement "$OUT/lifted"
$B/davi eval --restored "$OUT/lifted" --reference "$OUT/truth" --card "$CARD" --method lifted \
  --markdown "$OUT/lifted.md"
# The README's figure: the sample photograph (models/samples/photo, one of the held-out four),
# lifted measurement | DAVI | truth, as a JPEG beside the model.
P=models/samples/photo
$B/davi degrade -m "$M" -i "$P" -o "$OUT/sample/measured" --lift "$OUT/sample/lifted" --seed 0
$B/davi restore -m "$M" -i "$OUT/sample/measured" -o "$OUT/sample/restored" --seed 0
$B/davi eval --restored "$OUT/sample/restored" --reference "$P" --measurement "$OUT/sample/lifted" \
  --sheet "${FIGURE:-$(dirname "$CARD")/photo.jpg}" > /dev/null
echo "photo-eval: $NAME on whole photographs: $OUT (sheet.png), rows in $CARD"
