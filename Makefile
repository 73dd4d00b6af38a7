# The two commands a newcomer needs: `make demo` and `make test`.
# `make bench` prints the benchmark figures.

CARGO ?= cargo
WASM_DIR := target/wasm32-wasip2/release

.PHONY: demo test bench setup plugins host services clean

## setup: toolchain pieces the build needs (idempotent)
setup:
	@scripts/setup.sh

## plugins: build the SDK, first-party and test plugins for wasm32-wasip2
plugins: setup
	cd plugins && $(CARGO) build --release --target wasm32-wasip2

## host: build the celer binary
host:
	$(CARGO) build -p celer --bin celer

## demo: build everything, run the seed jobs end to end on the embedded default
demo: plugins host
	@scripts/demo.sh

## services: start the real services the tests use (Redis, …), idempotently
services:
	@scripts/services.sh up

## test: every test: unit, SDK, and end-to-end against real celer processes and services
test: plugins host services
	cd plugins && $(CARGO) test -p celer-plugin -p hello -p email -p export -p cleanup -p events -p audit -p permissions
	$(CARGO) nextest run --workspace --no-fail-fast

## bench: benchmarks (release build), printed beside their goals
bench: plugins services
	@scripts/bench.sh

clean:
	$(CARGO) clean
