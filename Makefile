# Two entry points: `make demo` (main job) and `make test`. Each creates or
# updates the virtual environment from pyproject.toml + constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.omniar-installed
PIP := $(PY) -m pip install -q --retries 10
EXTRAS := .[dev,text]
# A download from the registry can break off mid-file: each install step is tried three times.
retry = for try in 1 2 3; do $(1) && break; test $$try = 3 && exit 1; sleep 10; done

.PHONY: demo test venv clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call retry,$(PIP) --upgrade pip)
	$(call retry,$(PIP) --resume-retries 20 -c constraints.txt -e '$(EXTRAS)')
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/omniar reconstruct --out outputs/reconstruction.mp4
	$(VENV)/bin/omniar generate --prompt "a red circle moves right on a black background" --out outputs/t2v.mp4

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs
