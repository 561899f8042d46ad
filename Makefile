# Set-up and the two everyday commands. `make demo` and `make test` work on a fresh machine:
# they create .venv (torch comes from the machine's wheel cache; about 2 minutes) first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint bench slurm-up slurm-down browser clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps torchattacks==3.5.1
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

# The report's tests open it in a real browser: Debian's chromium, headless.
browser:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then echo "installing chromium (apt) for the report's browser tests"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; \
	else echo "not root: the browser tests will skip (chromium is not installed)"; fi

test: $(STAMP) lint slurm-up browser
	$(PY) -m pytest $(ARGS)

bench: $(STAMP)
	$(PY) -m bench.run $(ARGS)

clean-outputs:
	rm -rf outputs
