# `make demo` and `make test` do all the set-up on a fresh machine: a virtual environment in .venv with the versions
# pinned by requirements.txt, used as pip constraints (torch==2.13.0 is the CPU build; an unpinned torch pulls
# CUDA). `make demo` installs what lmforge itself needs; `make test` adds pyproject.toml's `dev` extra (the server,
# the applications, GGUF, TensorBoard, the test and lint tools).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP_INSTALL := $(PY) -m pip install --quiet -c requirements.txt

.PHONY: demo test ext llama-cpp clean

# Installing lmforge compiles its fused decode step (setup.py) against the venv's own torch, so the build
# requirements go in first and the install runs without build isolation.
$(VENV)/.base: requirements.txt pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PIP_INSTALL) setuptools ninja torch
	$(PIP_INSTALL) --no-build-isolation -e .
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(PIP_INSTALL) --no-build-isolation -e '.[dev]'
	touch $@

# (Re)build the fused decode step after lmforge/infer/fused_decode.cpp changed; a no-op when it is current.
ext: $(VENV)/.base
	$(PY) setup.py --quiet build_ext --inplace

demo: $(VENV)/.base ext
	$(VENV)/bin/lmforge demo

test: $(VENV)/.installed ext
	$(PY) -m pytest -q --run-slow

# Optional: llama-cpp-python compiles llama.cpp from source (15+ minutes on 2 cores; pip caches the wheel) so the
# GGUF tests also run the exported files in llama.cpp. Without it those tests skip with a reason.
llama-cpp: $(VENV)/.installed
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PY) -m pip install --quiet llama-cpp-python==0.3.36

clean:
	rm -rf $(VENV) runs build lmforge/infer/_fused_decode_*
