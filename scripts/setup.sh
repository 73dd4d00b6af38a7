#!/usr/bin/env bash
# Installs what the build needs beyond the Rust toolchain itself. Safe to re-run.
set -euo pipefail
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  echo "setup: installing the wasm32-wasip2 target" >&2
  rustup target add wasm32-wasip2
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest" >&2
  cargo install cargo-nextest --locked
fi
