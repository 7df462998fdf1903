#!/usr/bin/env bash
# Packs what the GPU machine's image lacks into .gpu/site.tar.xz (about 5 MB): Python 3.12 wheels of diffusers and
# its small dependencies, and a DeepSpeed wheel built here, unpacked into one archive that the tools/gpu_*.sh
# scripts unpack there (tools/gpu_env.sh). Run from the repository root after `make venv`.
set -euo pipefail
PY=${PY:-.venv/bin/python}
PACKAGES="diffusers hjson pydantic pydantic_core annotated-types typing-inspection importlib_metadata"
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/site
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -c constraints.txt -d .gpu/wheels $PACKAGES
"$PY" -m pip wheel -q --no-deps --no-build-isolation -c constraints.txt -w .gpu/wheels deepspeed
for w in .gpu/wheels/*.whl; do "$PY" -m zipfile -e "$w" .gpu/site; done
tar cJf .gpu/site.tar.xz -C .gpu site && rm -rf .gpu/wheels .gpu/site
