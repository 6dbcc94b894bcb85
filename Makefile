# The README's two commands: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck unit proto clean bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest -m "not model and not gpu" -q

# One BLAS thread in tests: client, server and executor share this machine's cores.
test: $(STAMP) lint typecheck
	BACKFILL_CPU_THREADS=$${BACKFILL_CPU_THREADS:-1} $(PY) -m pytest -q -ra

# Options pass through, e.g. make demo DEMO_ARGS="--quick --trace my-trace.csv"
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m client.demo $(DEMO_ARGS)

# The benchmarks of the README (several minutes each; they print tables).
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m engine_builder profile $$($(PY) -c 'from engine_builder.default import ensure_default_engine as e; print(e())')
	$(PY) -m benchmarks.bench_cpu_engine
	$(PY) -m benchmarks.bench_quant
	$(PY) -m benchmarks.bench_scheduler --engine default --rates 1.5,2.85 --plot bench-out/slo.png --json-out bench-out/slo.json
	$(PY) -m benchmarks.bench_frontend
	$(PY) -m benchmarks.bench_jobs

clean:
	rm -rf $(VENV) build *.egg-info
