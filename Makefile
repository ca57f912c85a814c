# vitexp — every target creates .venv itself on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned: these builds import together with torchvision and
# run on CPU or GPU. Override e.g. `make TORCH_SPEC="torch==2.5.1 torchvision==0.20.1"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# test files run in parallel, one worker per core (each file on one worker: its module
# fixtures are built once); TEST_WORKERS=0 runs them in this process
TEST_WORKERS ?= auto
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile

.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install vitexp (editable) with dev tools

# the quickstart pretraining that `make finetune` and `make visualize` use (runs started by
# hand go to outputs/quickstart_pretrain/<date_time>/)
QUICKSTART := outputs/quickstart_pretrain/quickstart
ARGS ?=
# Without a GPU, the quickstart pretraining runs as 2 CPU processes (DDP over gloo, one
# thread each): ~1.6x faster than one process on 2 cores for a model this small.
CPU_DDP = $$($(PY) -c "import os, torch; print('' if torch.cuda.is_available() or (os.cpu_count() or 1) < 2 else 'trainer=ddp trainer.accelerator=cpu')")

pretrain: $(VENV)/.installed  ## pretrain the tiny ViT on `shapes` (dataset A); resumes if interrupted
	@if [ -f $(QUICKSTART)/results.json ]; then \
		echo "pretrained model exists: $(QUICKSTART)/checkpoints/last.ckpt (make clean-runs to redo)"; \
	elif [ -e $(QUICKSTART)/checkpoints/last.ckpt ]; then \
		$(PY) -m vitexp.train +experiment=quickstart_pretrain $(CPU_DDP) hydra.run.dir=$(QUICKSTART) ckpt_path=last; \
	else \
		$(PY) -m vitexp.train +experiment=quickstart_pretrain $(CPU_DDP) hydra.run.dir=$(QUICKSTART); \
	fi

finetune: pretrain  ## the main job: pretrain if needed, fine-tune on digits (dataset B), print the test accuracy
	$(PY) -m vitexp.train +experiment=quickstart_finetune pretrained=$(QUICKSTART) $(ARGS)

sweep: $(VENV)/.installed  ## the position-embedding ablation (paper's Table 8) on embedded data, then its table
	@dir=$${SWEEP_DIR:-multirun/ablation_posemb/$$(date +%Y-%m-%d_%H-%M-%S)}; \
	$(PY) -m vitexp.train +experiment=ablation_posemb hydra.sweep.dir=$$dir $(ARGS) && \
	$(PY) -m vitexp.report $$dir

reproduce: $(VENV)/.installed  ## the paper's experiments on real data (Fashion-MNIST) and the quickstart (resumable; docs/reproduce.md has its time) -> outputs/reproduce/report.html
	$(PY) -m vitexp.reproduce --out outputs/reproduce $(ARGS)

visualize: pretrain  ## the paper's four figures of the quickstart checkpoint -> $(QUICKSTART)/figures/
	$(PY) -m vitexp.visualize pretrained=$(QUICKSTART)/checkpoints/last.ckpt $(ARGS)

scratch: $(VENV)/.installed  ## baseline: the same model trained on digits from scratch, same budget
	$(PY) -m vitexp.train +experiment=quickstart_scratch $(ARGS)

gpu-check: $(VENV)/.installed  ## first run on a new (GPU) machine: bf16, compile, fused, clipping, resume, DDP, img/s
	@mkdir -p outputs
	$(PY) -m vitexp.gpu_check --out outputs/gpu_check.json $(ARGS)

bench: $(VENV)/.installed  ## speed and memory vs timm (CPU; GPU when present) and the data pipeline -> outputs/bench.json
	@mkdir -p outputs
	$(PY) -m vitexp.bench --out outputs/bench.json $(ARGS)

test: $(VENV)/.installed  ## run the test suite (fails if no test ran); SLURM tests need root
	$(PY) -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

test-fast: $(VENV)/.installed  ## the tests without the slow end-to-end, resume and SLURM ones
	$(PY) -m pytest -m "not slow" $(PYTEST_PARALLEL) $(PYTEST_ARGS)

lint: $(VENV)/.installed  ## ruff check + format check
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

format: $(VENV)/.installed  ## ruff format + autofix
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

clean:  ## remove caches and build files (keeps .venv and every run's outputs)
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +

clean-runs:  ## DELETE all run outputs: outputs/ and multirun/ (checkpoints included)
	rm -rf outputs multirun

distclean: clean  ## also remove .venv
	rm -rf $(VENV)

.PHONY: help install pretrain finetune sweep reproduce visualize scratch gpu-check bench test test-fast lint format clean clean-runs distclean
