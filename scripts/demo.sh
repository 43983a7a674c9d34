#!/usr/bin/env bash
# The main job on the embedded default data, from the existing commands:
#   synthetic webdataset -> stage 1 (vision-language) -> stage 2 (audio-language, all but audio
#   frozen) -> zero-shot retrieval and classification on the held-out test split.
# Usage: scripts/demo.sh [OUT] (default demo-out); STEPS1/STEPS2 set the training lengths.
set -euo pipefail
OUT=${1:-demo-out}
STEPS1=${STEPS1:-300}
STEPS2=${STEPS2:-200}
PEACE=${PEACE:-peace}

$PEACE data synth "$OUT/data" --overwrite
$PEACE pretrain configs/stage1_tiny.toml --no-progress \
    --set output_dir="$OUT/stage1" \
    --set "data.datasets.0.urls=$OUT/data/train/image_text-*.tar" \
    --set schedule.total_steps="$STEPS1" --set schedule.warmup_steps=$((STEPS1 / 10)) \
    --set data.workers=1
$PEACE pretrain configs/stage2_tiny.toml --no-progress \
    --set output_dir="$OUT/stage2" --set model.init_from="$OUT/stage1" \
    --set "data.datasets.0.urls=$OUT/data/train/audio_text-*.tar" \
    --set schedule.total_steps="$STEPS2" --set data.workers=1
$PEACE eval "$OUT/stage1/model.safetensors" "$OUT/data/test/image_text-*.tar" \
    --prompts vision="$OUT/data/prompts/vision.json" --out "$OUT/eval-vision" --quiet \
    --metrics-log stage1="$OUT/stage1/metrics.jsonl"
$PEACE eval "$OUT/stage2/model.safetensors" "$OUT/data/test/audio_text-*.tar" \
    --prompts audio="$OUT/data/prompts/audio.json" --out "$OUT/eval-audio" --quiet \
    --metrics-log stage2="$OUT/stage2/metrics.jsonl"
echo "report: $OUT/eval-vision and $OUT/eval-audio (metrics.json, confusion matrices, curves)"
