#!/usr/bin/env bash
# The prepared run for a separate GPU machine. Here: `bash tools/gpu_site.sh` (see gpu_env.sh). Then one
# device call, carrying .gpu:  bash tools/gpu_checks.sh   (about 4 minutes)
# It runs the CUDA tests, the MoE benchmark and the pipeline speed in bf16; env.txt, tests.txt,
# moe_cuda.json and pipeline_speed_cuda.json land in $OUT.
set -euo pipefail
OUT=${OUT:-runs/gpu_checks}
source tools/gpu_env.sh
"$PYTHON" - <<'PY' | tee "$OUT/env.txt"
import torch, torch.nn.functional as F
print(torch.__version__, torch.cuda.get_device_name(), "F.grouped_mm:", hasattr(F, "grouped_mm"),
      "torch._grouped_mm:", hasattr(torch, "_grouped_mm"))
PY
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_moe.py tests/test_backbone.py 2>&1 | tee "$OUT/tests.txt"
"$PYTHON" benchmarks/moe.py --device cuda --dtype bf16 --repeats 20 --out "$OUT/moe_cuda.json" 2>&1 | tail -8
"$PYTHON" benchmarks/pipeline_speed.py --device cuda --out "$OUT/pipeline_speed_cuda.json" 2>&1 | tail -3
