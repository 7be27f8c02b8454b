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
$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q "torch==2.13.0"
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

setup: $(VENV)/.installed
	$(BIN)/python manage.py migrate --noinput -v 0

run: setup
	$(BIN)/python manage.py serve

test: setup
	$(PYTEST) $(PYTEST_ARGS)

# Everything but the slow end-to-end flows (marked `slow`), for use while working; `make test` and CI run them too.
test-fast: setup
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

# Refresh the Simplified Chinese catalogue after changing strings (needs GNU gettext); the .mo is committed.
messages: setup
	$(BIN)/python manage.py makemessages -l zh_Hans --ignore=.venv --ignore=var
	$(BIN)/python manage.py compilemessages --ignore=.venv

clean:
	rm -rf $(VENV) var
