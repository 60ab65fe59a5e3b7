# recgw: `make run` starts a local stack, `make test` runs every check and test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/recgw/v1/*.proto)
BUF_VERSION := 1.75.0
TS_CLIENT := clients/ts

.PHONY: install run test lint proto-lint typecheck pytest test-go test-ts test-java fuzz bench bench-tools test-s3compat clean go-generate go-generated-check

# MinIO and tusd for `make bench` and `make test-s3compat`: built from source with `go install`
# (MinIO takes about 8 minutes on 2 cores) into a cache outside the repository, once per version.
BENCH_TOOLS   ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/recgw-bench/bin
MINIO_VERSION := v0.0.0-20260212201848-7aac2a2c5b7c
TUSD_VERSION  := v2.9.1
MINIO_BIN     := $(BENCH_TOOLS)/minio-$(MINIO_VERSION)/minio
TUSD_BIN      := $(BENCH_TOOLS)/tusd-$(TUSD_VERSION)/tusd
TOOLS_ENV     := RECGW_MINIO_BIN=$(MINIO_BIN) RECGW_TUSD_BIN=$(TUSD_BIN)
# The tests that S3 itself decides: uploads, checksums, conditional writes, policies.
S3COMPAT_TESTS := tests/test_upload.py tests/test_bad_input.py tests/test_lifecycle.py \
	tests/test_policy.py tests/test_s3compat.py

install: $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml clients/python/setup.py $(PROTOS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the client package generates the gRPC code from protos/ while it builds
	$(BIN)/python -m pip install -q -e 'clients/python[cli]'
	$(BIN)/python -m pip install -q -e '.[devstack,test]'
	# upgrading from a server package that owned bin/recgw removes the client's script: restore it
	test -x $(BIN)/recgw || $(BIN)/python -m pip install -q --no-deps --force-reinstall -e 'clients/python[cli]'
	touch $@

run: install
	$(BIN)/recgw dev

test: lint pytest test-go test-ts test-java

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

# TypeScript client: npm ci, generate + compile, unit tests, then e2e tests against the live stack.
test-ts: install
	cd $(TS_CLIENT) && npm ci --no-audit --no-fund
	npm --prefix $(TS_CLIENT) run build
	npm --prefix $(TS_CLIENT) test
	$(BIN)/python -m tests.e2e_stack -- npm --prefix $(TS_CLIENT) run test:e2e

# Java client: build + unit tests, then the end-to-end tests against a live stack. Maven logs
# warnings only, except Surefire's result lines.
MVN_JAVA := mvn -B -ntp -Dstyle.color=never -f clients/java/pom.xml -Dorg.slf4j.simpleLogger.defaultLogLevel=warn \
	-Dorg.slf4j.simpleLogger.log.org.apache.maven.plugin.surefire=info
test-java: install
	$(MVN_JAVA) verify
	$(BIN)/python -m tests.e2e_stack -- $(MVN_JAVA) surefire:test -Dgroups=e2e

# A long, randomized fuzzing pass (make test runs a short, fixed one); FUZZ_EXAMPLES per target.
FUZZ_EXAMPLES ?= 5000
fuzz: install
	RECGW_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest tests/test_fuzz.py $(PYTEST_ARGS)

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

bench: install bench-tools
	$(TOOLS_ENV) $(BIN)/python -m bench $(BENCH_ARGS)

bench-tools: $(MINIO_BIN) $(TUSD_BIN)

$(MINIO_BIN):
	GOBIN=$(dir $@) go install github.com/minio/minio@$(MINIO_VERSION)

$(TUSD_BIN):
	GOBIN=$(dir $@) go install github.com/tus/tusd/v2/cmd/tusd@$(TUSD_VERSION)

# The same integration tests against MinIO instead of moto (RECGW_TEST_S3=minio).
test-s3compat: install $(MINIO_BIN)
	RECGW_TEST_S3=minio $(TOOLS_ENV) $(BIN)/pytest $(S3COMPAT_TESTS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) clients/python/src/recgw build .mypy_cache .ruff_cache .pytest_cache
	rm -rf $(TS_CLIENT)/node_modules $(TS_CLIENT)/dist $(TS_CLIENT)/dist-test $(TS_CLIENT)/src/gen
