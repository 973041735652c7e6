# polyhead: `make test` and `make serve` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test serve bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The pinned CPU torch lies on local disk; a bare `torch` would pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

serve: $(STAMP)
	@echo "make serve: the HTTP server arrives with the serving issue (issue 3); not available yet." >&2
	@exit 1

bench: $(STAMP)
	$(PY) benchmarks/engine_throughput.py

clean:
	rm -rf $(VENV)
