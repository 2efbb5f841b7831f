# Every target runs in .venv at the repository root, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= /tmp/t5train_demo
TEXT_DEMO_DIR ?= /tmp/t5train_text
PYTEST_ARGS ?=
# pytest-xdist processes (0: none); each test file runs in one of them.
PYTEST_WORKERS ?= 2

.PHONY: install install-test demo demo-text test bench lint smoke clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,lint]'
	# T5's reference implementations, for parity tests only; its declared pins predate this stack.
	$(PY) -m pip install --quiet --no-deps t5==0.9.4
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

# Pretrains with T5's span corruption on English text shipped with Python: builds the corpus and
# a SentencePiece vocabulary, trains the mini model, then fills in sentinels of held-out sentences.
demo-text: install
	rm -rf $(TEXT_DEMO_DIR)
	$(PY) scripts/python_text_corpus.py --output=$(TEXT_DEMO_DIR)/corpus
	$(PY) -m t5train.vocab --input=$(TEXT_DEMO_DIR)/corpus/train.txt --vocab_size=2000 \
	  --output=$(TEXT_DEMO_DIR)/spm
	$(PY) -m t5train.train --gin_file=gin/demo_text.gin --gin_file=$(TEXT_DEMO_DIR)/spm/vocab.gin \
	  --gin.TRAIN_FILES="'$(TEXT_DEMO_DIR)/corpus/train.txt'" \
	  --gin.VALIDATION_FILES="'$(TEXT_DEMO_DIR)/corpus/validation.txt'" \
	  --gin.MODEL_DIR="'$(TEXT_DEMO_DIR)/model'"
	$(PY) -m t5train.infer --gin_file=gin/runs/infer.gin --gin_file=$(TEXT_DEMO_DIR)/model/config.gin \
	  --gin.CHECKPOINT_PATH="'$(TEXT_DEMO_DIR)/model'" --gin.INFER_OUTPUT_DIR="'$(TEXT_DEMO_DIR)/inference'" \
	  --gin.INPUT_FILE="'$(TEXT_DEMO_DIR)/corpus/heldout.tsv'"
	@echo "Held-out sentences, the spans the model fills in, and the hidden spans:"
	@$(PY) -c "import json, sys; [print(f\"{r['inputs']}\n  model: {r['prediction']}\n  truth: {r['targets']}\") for r in map(json.loads, open(sys.argv[1]))]" \
	  $(TEXT_DEMO_DIR)/inference/heldout.tsv-predict.jsonl

# The CI smoke run.
smoke: install
	rm -rf /tmp/t5train_smoke
	$(PY) -m t5train.train --gin_file=gin/models/t5_1_1/tiny.gin --gin_file=gin/runs/pretrain.gin \
	  --gin_file=gin/tasks/demo.gin --gin.MODEL_DIR="'/tmp/t5train_smoke'" --gin.TRAIN_STEPS=20

test: install-test
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=30 $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks.bench
	$(PY) -m benchmarks.bench_data --out=docs/bench/cpu_data.json
	$(PY) -m benchmarks.infer_buckets --json_out=docs/bench/cpu_infer_buckets.json
	$(PY) -m pip install --quiet -e '.[serve]' httpx==0.29.0 && $(PY) -m benchmarks.serve_load --out=docs/bench/cpu_serve.json

lint: install-test
	$(VENV)/bin/ruff check t5train tests scripts benchmarks
	$(PY) scripts/check_imports.py

clean:
	rm -rf $(VENV) .pytest_cache
