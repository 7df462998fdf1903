#!/usr/bin/env bash
# The second prepared device run for text-to-video, once tools/gpu_tokenizer.sh has picked a tokenizer
# that passed its rule: retrain the AR model on that tokenizer's codes by the shipped recipe (configs/ar_shapes.yaml:
# 20,000 clips pre-tokenized on the GPU, 2,000 steps of batch 64, bf16), with the half-depth sub-model in the
# elastic draw from the start (model.elastic_min_depth=3). Put the pick in an ignored folder and carry it:
#   TOKENIZER=runs/tok_gpu bash tools/gpu_ar.sh      (carry [".gpu", "runs/tok_gpu"]; about 8 minutes, estimated)
# $OUT gets model/ (12 MB shards) and train.log. Back here, assemble the pipeline from it and the tokenizer
# (TextToVideoPipeline(tokenizer, TextTokenizer(), model, 96, 33).save_pretrained(DIR)) and judge it on this
# CPU with `omniar eval t2v --model DIR`, like the shipped one.
# Dry run here: TOKENIZER=... OUT=/tmp/ga SITE=none PYTHON=.venv/bin/python PRECISION=fp32 STEPS=2 BATCH=2 CLIPS=4
set -euo pipefail
OUT=${OUT:-runs/gpu_ar}
source tools/gpu_env.sh
: "${TOKENIZER:?set TOKENIZER to the tokenizer folder to train on}"
STEPS=${STEPS:-2000} BATCH=${BATCH:-64} PRECISION=${PRECISION:-bf16} CLIPS=${CLIPS:-20000}
WORK=${WORK:-/tmp/gpu_ar}
rm -rf "$WORK" && mkdir -p "$WORK"
"$PYTHON" -m omniar.cli train ar --config configs/ar_shapes.yaml --out "$WORK/ar" --steps "$STEPS" \
  --set train.tokenizer="$TOKENIZER" --set data.cache_dir="$WORK/codes" --set data.num_clips="$CLIPS" \
  --set data.num_workers=14 --set train.micro_batch_size="$BATCH" --set train.precision="$PRECISION" \
  --set train.warmup_steps=$((STEPS / 10)) --set model.elastic_min_depth=3 2>&1 | tee "$OUT/train.log"
"$PYTHON" - "$WORK/ar/final/model" "$OUT/model" <<'PY'
import sys
from omniar.backbone import OmniARModel
OmniARModel.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], max_shard_size="12MB")
PY
