#!/usr/bin/env bash
# The prepared run for a lent GPU machine (its image has torch, timm, safetensors, ... but not
# diffusers or DeepSpeed). Here: `make gpu-site` (the missing packages, one 5 MB archive in .gpu/). Then one
# device call, carrying .gpu:  bash benchmarks/gpu_checks.sh   (about 4 minutes)
# It runs the CUDA tests, the MoE benchmark and the pipeline speed in bf16; env.txt, tests.txt,
# moe_cuda.json and pipeline_speed_cuda.json land in $OUT.
set -euo pipefail
OUT=${OUT:-runs/gpu_checks}
mkdir -p "$OUT" /tmp/site
tar xJf .gpu/site.tar.xz -C /tmp/site --strip-components=1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, torch.nn.functional as F
print(torch.__version__, torch.cuda.get_device_name(), "F.grouped_mm:", hasattr(F, "grouped_mm"),
      "torch._grouped_mm:", hasattr(torch, "_grouped_mm"))
PY
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_moe.py tests/test_backbone.py 2>&1 | tee "$OUT/tests.txt"
python3 benchmarks/moe.py --device cuda --dtype bf16 --repeats 20 --out "$OUT/moe_cuda.json" 2>&1 | tail -8
python3 benchmarks/pipeline_speed.py --device cuda --out "$OUT/pipeline_speed_cuda.json" 2>&1 | tail -3
