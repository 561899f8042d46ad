# Set-up and the two everyday commands. `make demo` and `make test` work on a fresh machine:
# they create .venv (torch comes from the machine's wheel cache; about 2 minutes) first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint bench clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(STAMP)
	$(PY) launch.py model.width=8 model.latent_dim=16 train=quick $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) lint
	$(PY) -m pytest $(ARGS)

bench: $(STAMP)
	$(PY) -m bench.run $(ARGS)

clean-outputs:
	rm -rf outputs
