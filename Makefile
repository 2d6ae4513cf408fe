# One-command set-up: `make demo` and `make test` create .venv and install pinned dependencies
# once (a stamp file records it; a changed pyproject.toml reinstalls), then do their job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup browser demo test test-fast lint docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The pinned torch build brings its CUDA libraries (~6 GiB in .venv): say so before pip
	# runs out of room half-way (a full disk once failed CI with a bare ENOSPC).
	@$(BIN)/python -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; \
	  free < 8 and print(f'setup: only {free:.1f} GiB free on this disk; .venv needs about 7 GiB', file=sys.stderr)"
	# torch first, from the pinned builds (a plain `torch` would pull a newer multi-GB build)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/embryo-ml demo --out demo_out

# The report test renders the HTML report in headless Chromium (Debian's `chromium` package):
# installed here when missing and apt can (as root); where it cannot, that one test skips and
# says why, and `make test` goes on.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  (DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y --no-install-recommends chromium || \
	   (timeout 300 apt-get update && DEBIAN_FRONTEND=noninteractive \
	    timeout 600 apt-get install -y --no-install-recommends chromium)) >/dev/null 2>&1 || \
	  echo "chromium could not be installed (needs apt-get and root): the browser test will skip"

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check embryo_ml tests scripts benchmarks

# The documentation site (mkdocs-material; the CLI reference is generated from the parser)
docs: $(STAMP)
	$(BIN)/mkdocs build --strict -d site

clean:
	rm -rf demo_out .pytest_cache
