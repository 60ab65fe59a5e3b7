# recgw: `make run` starts a local stack, `make test` runs every check and test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/recgw/v1/*.proto)
BUF_VERSION := 1.75.0

.PHONY: install run test lint proto-lint typecheck pytest bench clean test-go go-generate go-generated-check

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

test: lint pytest test-go

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

# Go client (clients/go): generated code is committed (Go convention); buf from npm runs the
# protoc plugins pinned as Go tool dependencies in clients/go/go.mod.
go-generate:
	cd clients/go && npx -y @bufbuild/buf@$(BUF_VERSION) generate

# Fails when clients/go/gen differs from what protos/ generate now.
go-generated-check:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	cd clients/go && npx -y @bufbuild/buf@$(BUF_VERSION) generate -o "$$tmp" && \
	diff -r gen "$$tmp/gen" && echo "clients/go/gen: up to date"

test-go: install go-generated-check
	cd clients/go && go mod download && test -z "$$(gofmt -l .)" && go vet ./... && go test ./...
	$(BIN)/python -m tests.e2e_stack -- go -C clients/go test -count=1 -run E2E ./...

bench: install
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) clients/python/src/recgw build .mypy_cache .ruff_cache .pytest_cache
