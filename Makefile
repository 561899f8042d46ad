# Set-up and the two everyday commands. `make demo` and `make test` work on a fresh machine:
# they create .venv (torch comes from the machine's wheel cache; about 2 minutes) first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint bench slurm-up slurm-down clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(STAMP)
	$(PY) launch.py sweep=demo cluster=local $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The end-to-end tests need the local two-node Slurm cluster; starting it needs root.
slurm-up:
	@if [ "$$(id -u)" = 0 ]; then bash slurm/cluster.sh up; \
	else echo "not root: the Slurm end-to-end tests will skip (slurm/cluster.sh needs root)"; fi

slurm-down:
	bash slurm/cluster.sh down

test: $(STAMP) lint slurm-up
	$(PY) -m pytest $(ARGS)

bench: $(STAMP)
	$(PY) -m bench.run $(ARGS)

clean-outputs:
	rm -rf outputs
