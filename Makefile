# Shortcuts for the commands in README.md (`make -n <target>` prints them). tests/test_deploy.py checks that
# `make -n test` is the README's test command.
VENV ?= .venv
PORT ?= 8000
BENCH_OUT ?= bench/results/stages-local.json

.PHONY: setup serve test lint bench image

setup:  ## install into $(VENV) (a CUDA torch where nvidia-smi sees a GPU)
	./setup_flux_optimized.sh

serve:  ## the service, draining on SIGTERM
	$(VENV)/bin/python flux_kontext_optimized.py serve --port $(PORT)

test:  ## what CI runs: install with the test tools, lint, the CPU test suite
	./setup_flux_optimized.sh --dev --ray && $(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/python -m pytest -q

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench:  ## the optimization stages on the full-size random-weight model (a GPU)
	FLUX_MODEL=random $(VENV)/bin/python bench/stages.py --runs 2 --out $(BENCH_OUT)

image:  ## the container image (needs Docker with BuildKit)
	docker build -f deploy/Dockerfile -t flux-kontext .
