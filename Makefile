# Two entry points: `make demo` (main job) and `make test`. Each creates or
# updates the virtual environment from pyproject.toml + constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.omniar-installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,text]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/omniar reconstruct --out outputs/reconstruction.mp4
	$(VENV)/bin/omniar generate --prompt "a red circle moves right on a black background" --out outputs/t2v.mp4

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs
