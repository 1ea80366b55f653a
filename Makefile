# Two commands for a fresh machine (nothing installed but python3):
#   make run    set up .venv, then generate text with the built-in tiny model on CPU
#   make test   set up .venv, then run the test suite (CPU; GPU tests skip themselves)
# Safe to re-run. torch==2.13.0 (CPU build) is installed only when no torch is importable; an
# existing torch (e.g. a CUDA build in the system site-packages) is kept. DeepSpeed (the baseline of
# the end-to-end sweeps) is installed with --no-build-isolation: its isolated build would fetch a torch.

VENV ?= .venv
VENV_FLAGS ?= --system-site-packages
PY := $(VENV)/bin/python
PROMPT ?= Hello, afsplit!

.PHONY: setup run test clean
setup: $(VENV)/.afsplit-installed

$(VENV)/.afsplit-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -c "import deepspeed" 2>/dev/null || $(PY) -m pip install --quiet --no-build-isolation deepspeed
	touch $@

run: setup
	$(VENV)/bin/afsplit generate --config configs/tiny.yaml --prompt "$(PROMPT)" --max-tokens 32

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache
