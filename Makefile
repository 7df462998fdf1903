# Two entry points: `make demo` (main job) and `make test`. Each creates or
# updates the virtual environment from pyproject.toml + constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.omniar-installed

.PHONY: demo test venv clean gpu-site

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/omniar reconstruct --out outputs/reconstruction.mp4
	$(VENV)/bin/omniar generate --prompt "a red circle moves right on a black background" --out outputs/t2v.mp4

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

# What a lent GPU machine's image lacks, for benchmarks/gpu_checks.sh: Python 3.12 wheels unpacked
# into one xz archive (5 MB; the tree and what it carries must stay under 64 MiB to travel).
GPU_PACKAGES := diffusers hjson pydantic pydantic_core annotated-types typing-inspection importlib_metadata
gpu-site: $(STAMP)
	rm -rf .gpu && mkdir -p .gpu/wheels .gpu/site
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux2014_x86_64 -c constraints.txt -d .gpu/wheels $(GPU_PACKAGES)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -c constraints.txt -w .gpu/wheels deepspeed
	for w in .gpu/wheels/*.whl; do $(PY) -m zipfile -e $$w .gpu/site; done
	tar cJf .gpu/site.tar.xz -C .gpu site && rm -rf .gpu/wheels .gpu/site

clean:
	rm -rf $(VENV) outputs
