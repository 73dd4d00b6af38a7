#!/usr/bin/env bash
# `make bench`: release-build benchmarks. Prints one JSON line per figure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/plugins"
cp target/wasm32-wasip2/release/hello.wasm "$work/plugins/hello.wasm"
cp plugins/hello/celer-plugin.toml "$work/plugins/hello.toml"
echo "== sandbox cost and embedded-queue throughput (release build) ==" >&2
cargo bench -p celer --bench sandbox -- "$work/plugins" "${BENCH_ITERATIONS:-20000}"
cp target/wasm32-wasip2/release/cache_probe.wasm "$work/plugins/cache_probe.wasm"
cp tests/plugins/cache-probe/celer-plugin.toml "$work/plugins/cache_probe.toml"
echo "== cache get from a guest vs from Rust: in-process, and Redis when reachable (release build) ==" >&2
cargo bench -p celer --bench cache_call -- "$work/plugins" "${BENCH_CACHE_GETS:-20000}"
scripts/bench-redis.sh
echo "== one-row database query from a guest vs sqlx from Rust: SQLite, and PostgreSQL when reachable (release build) ==" >&2
cargo bench -p celer --bench db_call -- "$root/target/wasm32-wasip2/release/db_probe.wasm" "${BENCH_DB_QUERIES:-2000}"
