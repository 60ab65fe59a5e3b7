#!/usr/bin/env bash
# Upload throughput of the Java client through a gateway: clients/java/bench.sh [MiB] [--no-checksums]
# Run it under the live stack, from the repository root:
#   .venv/bin/python -m tests.e2e_stack -- clients/java/bench.sh 256
# `--build-only` compiles and exits; `--no-build` (first argument) runs what was compiled
# (`make bench` builds once, then runs it in every round).
set -euo pipefail
cd "$(dirname "$0")"
if [[ "${1:-}" == "--no-build" ]]; then
  shift
else
  mvn -B -q -ntp -Dstyle.color=never test-compile dependency:build-classpath \
    -Dmdep.outputFile=target/bench.classpath -Dmdep.includeScope=test
  if [[ "${1:-}" == "--build-only" ]]; then
    exit 0
  fi
fi
exec java -cp "target/classes:target/test-classes:$(cat target/bench.classpath)" dev.recgw.client.Bench "$@"
