# recgw: `make run` starts a local stack, `make test` runs every check and test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/recgw/v1/*.proto)
BUF_VERSION := 1.75.0

.PHONY: install run test lint proto-lint typecheck pytest bench bench-tools test-s3compat clean

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
	$(BIN)/python -m pip install -q -e clients/python
	$(BIN)/python -m pip install -q -e '.[devstack,test]'
	touch $@

run: install
	$(BIN)/recgw dev

test: lint pytest

lint: install proto-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy server tests bench clients/python/src/recgw_client

# Buf's STANDARD lint, via the npm package of the buf binary (skipped without npx).
proto-lint:
	@if command -v npx >/dev/null 2>&1; then \
		cd protos && npx -y @bufbuild/buf@$(BUF_VERSION) lint && echo "buf lint: ok"; \
	else echo "buf lint skipped: npx not found"; fi

pytest: install
	$(BIN)/pytest $(PYTEST_ARGS)

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
