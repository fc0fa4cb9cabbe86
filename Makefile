# `make demo` and `make test` do all the set-up on a fresh machine: a virtual environment in .venv with the
# pinned dependencies of requirements.txt (torch==2.13.0 is the CPU build; an unpinned torch pulls CUDA).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test llama-cpp clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/lmforge demo

test: $(VENV)/.installed
	$(PY) -m pytest -q --run-slow

# Optional: llama-cpp-python compiles llama.cpp from source (15+ minutes on 2 cores; pip caches the wheel) so the
# GGUF tests also run the exported files in llama.cpp. Without it those tests skip with a reason.
llama-cpp: $(VENV)/.installed
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PY) -m pip install --quiet llama-cpp-python==0.3.36

clean:
	rm -rf $(VENV) runs
