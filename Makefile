# The two commands of the README: `make demo` (main job) and `make test` (test suite).
# Each sets everything up on a fresh machine first (scripts/setup.sh is idempotent).
.PHONY: setup demo test bench clean-venv

setup:
	./scripts/setup.sh

demo:
	./scripts/setup.sh
	.venv/bin/arow train --out runs/fmnist-arow $(ARGS)

test:
	EXTRAS=dev ./scripts/setup.sh
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

bench:
	./scripts/setup.sh
	.venv/bin/python benchmarks/bench_train.py
