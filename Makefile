# closeloop: `make run` starts the server on embedded defaults, `make test` runs the suite.
# Both install everything they need first (virtualenv, Python packages, Debian packages).
VENV ?= .venv
PY := $(VENV)/bin/python
export OPENBLAS_NUM_THREADS ?= 1
export OMP_NUM_THREADS ?= 1

.PHONY: install run test e2e screenshots lint bench clean

install:
	@bash scripts/bootstrap.sh

run: install
	$(VENV)/bin/closeloop serve

# Workers: real-time calls mostly wait, so two workers per core (at most four) cut the wall time
# (here, 2 cores: 825 s with two workers, 507 s with four); each file runs whole on one worker (its
# module fixtures, e.g. a server with loaded models, are built once). The suite holds with two
# workers on one core (`taskset -c 0 make test`), the same load per core as four on two.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n * 2 > 4 ? 4 : n * 2 )))
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

e2e: install
	$(PY) -m pytest -q tests/e2e

# the README's page screenshots: written by the browser tests, copied next to the README
screenshots: e2e
	mkdir -p docs/img/screens
	cd artifacts/screenshots && cp $$(sed -n 's#.*](docs/img/screens/\([^)]*\)).*#\1#p' ../../README.md) ../../docs/img/screens/

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy -p pipeline -p adapters -p app -p crm_bridge -p telephony -p voice -p web -m server

bench: install
	$(PY) benchmarks/text_throughput.py

clean:
	rm -rf $(VENV) .closeloop
