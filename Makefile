# Every target runs in .venv at the repository root, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= /tmp/t5train_demo
PYTEST_ARGS ?=
# pytest-xdist processes (0: none); each test file runs in one of them.
PYTEST_WORKERS ?= 2

.PHONY: install install-test demo test bench lint smoke clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,lint]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# Trains the demo model to sort digits, then decodes the held-out examples with the infer binary.
demo: install
	rm -rf $(DEMO_DIR)
	$(PY) -m t5train.train --gin_file=gin/demo.gin --gin.MODEL_DIR="'$(DEMO_DIR)'"
	$(PY) -m t5train.infer --gin_file=gin/runs/infer.gin --gin_file=$(DEMO_DIR)/config.gin \
	  --gin.CHECKPOINT_PATH="'$(DEMO_DIR)'" --gin.INFER_OUTPUT_DIR="'$(DEMO_DIR)/inference'"
	@echo "First held-out predictions ($(DEMO_DIR)/inference/sort_digits-predict.jsonl):"
	@head -n 8 $(DEMO_DIR)/inference/sort_digits-predict.jsonl

# The CI smoke run.
smoke: install
	rm -rf /tmp/t5train_smoke
	$(PY) -m t5train.train --gin_file=gin/models/t5_1_1/tiny.gin --gin_file=gin/runs/pretrain.gin \
	  --gin_file=gin/tasks/demo.gin --gin.MODEL_DIR="'/tmp/t5train_smoke'" --gin.TRAIN_STEPS=20

test: install-test
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: install
	$(PY) -m t5train.bench

lint: install-test
	$(VENV)/bin/ruff check t5train tests scripts
	$(PY) scripts/check_imports.py

clean:
	rm -rf $(VENV) .pytest_cache
