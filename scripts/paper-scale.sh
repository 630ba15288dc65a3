#!/usr/bin/env bash
# `make paper-scale`: the whole chain at the paper's 256 px on the CPU, with random weights in
# place of the published checkpoints (which cannot be downloaded here):
#   1. an FFHQ-256 prior (DPS's ffhq_10m.pt config, 93.6 M parameters) written as torch.save
#      writes it, brought in with `davi-train import`;
#   2. DAVI steps at batch 1 on the SR x4 config (models/configs/paper/ffhq256-sr4.yaml), on
#      256 px crops of the scikit-image photos, timed with peak memory, without and with
#      gradient checkpointing;
#   3. export, `davi verify` (fp32 parity), `davi degrade` and `davi restore` of 256 px images;
#   4. guided-diffusion's ImageNet-256 UNet (552.8 M parameters, 2.2 GB) as I_phi: export
#      through ONNX external data and `davi verify`.
# Figures go to OUT/figures.txt. OUT defaults to out/paper-scale; STEPS to 2.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/paper-scale}
STEPS=${STEPS:-2}
B=target/release
mkdir -p "$OUT"
FIG="$OUT/figures.txt"
: > "$FIG"
timed() { # LABEL CMD... : runs CMD, records wall seconds and peak RSS (GNU time) in figures.txt
  local label=$1; shift
  local t0; t0=$(date +%s.%N)
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -f "%M" -o "$OUT/.rss" "$@"
  else
    "$@"; echo 0 > "$OUT/.rss"
  fi
  local t1; t1=$(date +%s.%N)
  printf '%s: %.1f s, peak RSS %.2f GiB\n' "$label" "$(echo "$t1 - $t0" | bc)" \
    "$(echo "$(cat "$OUT/.rss") / 1048576" | bc -l)" | tee -a "$FIG"
}
command -v bc >/dev/null || { apt-get update -qq && apt-get install -y -qq bc >/dev/null; }
[ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq time >/dev/null; } || true

echo "== 1. FFHQ-256 prior with random weights, as a torch.save checkpoint, imported"
$B/davi-train describe --config models/configs/adm/ffhq256.json | tee -a "$FIG"
$B/davi-train describe --config models/configs/adm/imagenet256-uncond.json | tee -a "$FIG"
$B/davi-train init --config models/configs/adm/ffhq256.json -o "$OUT/ffhq256-random.pt"
$B/davi-train import "$OUT/ffhq256-random.pt" --config models/configs/adm/ffhq256.json -o "$OUT/ffhq256.safetensors"

echo "== 2. DAVI on SR x4 at 256 px, batch 1, $STEPS steps"
# The paper config, on 256 px crops of the scikit-image photos (astronaut held out) and this prior.
sed -e '/^data:/,/^train:/{/^train:/!d}' -e "s|^train:|data:\n  kind: photos\n  test_photos: [astronaut]\n  downscale: 1\ntrain:|" \
    -e "s|teacher: .*|teacher: $OUT/ffhq256.safetensors|" -e 's|batch_size: .*|batch_size: 1|' \
    -e 's|checkpoint_every: .*|checkpoint_every: 1000\n    validate_every: 0|' \
    models/configs/paper/ffhq256-sr4.yaml > "$OUT/ffhq256-sr4.yaml"
rm -rf "$OUT/davi"
timed "DAVI, $STEPS steps at batch 1 (3 UNets of 93.6 M, 2 with AdamW)" \
  $B/davi-train davi --config "$OUT/ffhq256-sr4.yaml" --run "$OUT/davi" --steps "$STEPS" --device cpu
tail -1 "$OUT/davi/metrics.csv" | awk -F, '{printf "DAVI steps/s at 256 px, batch 1: %s\n", $7}' | tee -a "$FIG"

echo "== 2b. the same step with gradient checkpointing of the UNet blocks (train.davi.checkpointing)"
sed -e 's|checkpointing: false|checkpointing: true|' "$OUT/ffhq256-sr4.yaml" > "$OUT/ffhq256-sr4-ckpt.yaml"
grep -q 'checkpointing: true' "$OUT/ffhq256-sr4-ckpt.yaml"
rm -rf "$OUT/davi-ckpt"
timed "DAVI with checkpointing, $STEPS steps at batch 1" \
  $B/davi-train davi --config "$OUT/ffhq256-sr4-ckpt.yaml" --run "$OUT/davi-ckpt" --steps "$STEPS" --device cpu
tail -1 "$OUT/davi-ckpt/metrics.csv" | awk -F, '{printf "DAVI steps/s with checkpointing: %s\n", $7}' | tee -a "$FIG"

echo "== 3. export, verify, degrade and restore at 256 px"
timed "export (ONNX + 2 parity pairs through tch)" \
  $B/davi-train export --checkpoint "$OUT/davi/ema.safetensors" --config "$OUT/ffhq256-sr4.yaml" -o "$OUT/model/model.onnx" -k 2
timed "davi verify (CPU EP)" $B/davi verify -m "$OUT/model/model.onnx"
rm -rf "$OUT/clean" "$OUT/meas" "$OUT/restored"
$B/davi-train images --config "$OUT/ffhq256-sr4.yaml" --split test -n 2 -o "$OUT/clean"
$B/davi degrade -m "$OUT/model/model.onnx" -i "$OUT/clean" -o "$OUT/meas"
timed "davi restore of 2 measurements (64 -> 256 px)" $B/davi restore -m "$OUT/model/model.onnx" -i "$OUT/meas" -o "$OUT/restored" --batch 1
timed "davi bench: the ONNX session at 256 px" $B/davi bench -m "$OUT/model/model.onnx" --batch 1 --seconds 5
timed "davi-train bench: tch eager at 256 px" $B/davi-train bench --checkpoint "$OUT/davi/ema.safetensors" --config "$OUT/ffhq256-sr4.yaml" --batch 1 --seconds 5

echo "== 4. ImageNet-256 UNet (552.8 M) as I_phi, through ONNX external data"
sed -e 's/^name: .*/name: imagenet256-sr4/' \
    -e 's/^  model_channels: .*/  model_channels: 256/' -e 's/^  num_res_blocks: .*/  num_res_blocks: 2/' \
    -e 's/^  attention_resolutions: .*/  attention_resolutions: [32, 16, 8]/' \
    "$OUT/ffhq256-sr4.yaml" > "$OUT/imagenet256-sr4.yaml"
$B/davi-train init --config "$OUT/imagenet256-sr4.yaml" -o "$OUT/imagenet256.safetensors"
timed "export of the 2.2 GB I_phi (external data, 1 parity pair)" \
  $B/davi-train export --checkpoint "$OUT/imagenet256.safetensors" --config "$OUT/imagenet256-sr4.yaml" -o "$OUT/imagenet/model.onnx" -k 1 --external-data
ls -la "$OUT/imagenet" | tee -a "$FIG"
timed "davi verify of the ImageNet-256 I_phi" $B/davi verify -m "$OUT/imagenet/model.onnx"
echo "paper-scale: done; figures in $FIG"
