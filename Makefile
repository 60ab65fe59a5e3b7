# recgw: `make run` starts a local stack, `make test` runs every check and test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/recgw/v1/*.proto)
BUF_VERSION := 1.75.0

.PHONY: install run test lint proto-lint typecheck pytest fuzz bench clean

install: $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml clients/python/setup.py $(PROTOS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the client package generates the gRPC code from protos/ while it builds
	$(BIN)/python -m pip install -q -e clients/python
	$(BIN)/python -m pip install -q -e '.[devstack,test]'
	touch $@

run: install
	$(BIN)/recgw dev

test: lint pytest

lint: install proto-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy server tests bench testdata clients/python/src/recgw_client

# Buf's STANDARD lint, via the npm package of the buf binary (skipped without npx).
proto-lint:
	@if command -v npx >/dev/null 2>&1; then \
		cd protos && npx -y @bufbuild/buf@$(BUF_VERSION) lint && echo "buf lint: ok"; \
	else echo "buf lint skipped: npx not found"; fi

pytest: install
	$(BIN)/pytest $(PYTEST_ARGS)

# A long, randomized fuzzing pass (make test runs a short, fixed one); FUZZ_EXAMPLES per target.
FUZZ_EXAMPLES ?= 5000
fuzz: install
	RECGW_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest tests/test_fuzz.py $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) clients/python/src/recgw build .mypy_cache .ruff_cache .pytest_cache
