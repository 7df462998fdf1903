# Sourced by the device scripts (tools/gpu_*.sh). The GPU machine's image has torch, timm, safetensors, ...
# but not diffusers or DeepSpeed: `bash tools/gpu_site.sh` packs them here into .gpu/site.tar.xz, which each device call
# carries. SITE=none skips the unpacking (a dry run in this checkout's venv: PYTHON=.venv/bin/python).
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
SITE=${SITE:-.gpu/site.tar.xz}
if [[ "$SITE" != none ]]; then
  mkdir -p /tmp/site
  tar xJf "$SITE" -C /tmp/site --strip-components=1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
