# MiniCloud: `make run` starts the portal, `make test` runs the whole suite. Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-fast setup messages clean

# Two pytest-xdist workers by default (docs/performance.md, "The test suite"); `make test WORKERS=0` runs in one
# process. PYTEST_ARGS adds pytest options (.ci/run leaves the pure engine tests out of the PostgreSQL pass).
WORKERS ?= 2
PYTEST = $(BIN)/python -m pytest -n $(WORKERS) --dist loadgroup

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and on its own, so pip takes the local CPU wheel (or keeps a GPU box's own CUDA build of 2.13.0)
# instead of resolving a multi-GB CUDA download through transformers/peft.
# llama-cpp-python (the GGUF exports are verified by running them in llama.cpp) is built from source by pip: once per
# machine, into a wheel cache every later .venv installs from (about 3 minutes on 2 cores; CPU-only, portable).
WHEELS ?= $(HOME)/.cache/minicloud/wheels
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF
$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q "torch==2.13.0"
	mkdir -p $(WHEELS)
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel \
	  --disable-pip-version-check -q --no-deps "llama-cpp-python==$(LLAMA_CPP_VERSION)" -w $(WHEELS)
	$(BIN)/pip install --disable-pip-version-check -q --find-links $(WHEELS) -r requirements.txt
	touch $@

# transformers 4.57 beside our 5.x, for the test that loads the 4.x-layout Hugging Face export the way labs pinned to
# 4.x do (its own huggingface_hub and tokenizers; put first on sys.path by that test's subprocess only).
$(VENV)/transformers4/.installed: | $(VENV)/.installed
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --target $(VENV)/transformers4 \
	  "transformers==4.57.6" "huggingface_hub==0.36.2" "tokenizers==0.22.2"
	touch $@

setup: $(VENV)/.installed
	$(BIN)/python manage.py migrate --noinput -v 0

run: setup
	$(BIN)/python manage.py serve

test: setup $(VENV)/transformers4/.installed
	$(PYTEST) $(PYTEST_ARGS)

# Everything but the slow end-to-end flows (marked `slow`), for use while working; `make test` and CI run them too.
test-fast: setup $(VENV)/transformers4/.installed
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

# Refresh the Simplified Chinese catalogue after changing strings (needs GNU gettext); the .mo is committed.
messages: setup
	$(BIN)/python manage.py makemessages -l zh_Hans --ignore=.venv --ignore=var
	$(BIN)/python manage.py compilemessages --ignore=.venv

clean:
	rm -rf $(VENV) var
