# MiniCloud: `make run` starts the portal, `make test` runs the whole suite. Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test setup messages clean

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
	$(BIN)/python -m pytest

# Refresh the Simplified Chinese catalogue after changing strings (needs GNU gettext); the .mo is committed.
messages: setup
	$(BIN)/python manage.py makemessages -l zh_Hans --ignore=.venv --ignore=var
	$(BIN)/python manage.py compilemessages --ignore=.venv

clean:
	rm -rf $(VENV) var
