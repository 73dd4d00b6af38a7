#!/usr/bin/env bash
# `make demo`: runs celer end to end on the embedded default (SQLite, no
# Redis, PostgreSQL or S3) in a temporary directory, then stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
celer="$root/target/debug/celer"
wasm="$root/target/wasm32-wasip2/release"
work=$(mktemp -d "${TMPDIR:-/tmp}/celer-demo.XXXXXX")
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
install_plugin() { # name source-dir: write-then-rename, as the docs recommend
  cp "$wasm/$1.wasm" "$work/plugins/.$1.wasm.tmp"
  cp "$2/celer-plugin.toml" "$work/plugins/$1.toml"
  mv "$work/plugins/.$1.wasm.tmp" "$work/plugins/$1.wasm"
}

mkdir -p "$work/plugins"
cd "$work"   # the embedded default lives in ./celer-data
install_plugin hello "$root/plugins/hello"

say "celer serve (embedded default: $work/celer-data)"
"$celer" serve 2> "$work/serve.log" &
server=$!
for _ in $(seq 1 300); do grep -q "celer serving" "$work/serve.log" && break; sleep 0.1; done
grep -q "celer serving" "$work/serve.log" || { cat "$work/serve.log"; exit 1; }
"$celer" plugins

say "celer enqueue hello.greet --kwargs '{\"name\":\"Ada\"}' --wait"
"$celer" enqueue hello.greet --kwargs '{"name":"Ada"}' --wait | grep -E '"(state|result|message|plugin|attempt)"'

say "a job that enqueues a follow-up (jobs capability, granted in the manifest)"
"$celer" enqueue hello.chain --kwargs '{"name":"Grace"}' --wait | grep -E '"(state|child|task|id)"'

say "progress and captured output"
"$celer" enqueue hello.progress --kwargs '{"steps":3}' --wait | grep -E '"(state|progress|done|total|log)"'

say "a delayed job (2 s), and a cancelled one"
delayed=$("$celer" enqueue hello.add --args '[2, 40]' --delay 2s)
cancelled=$("$celer" enqueue hello.noop --delay 1m)
"$celer" cancel "$cancelled" >/dev/null
echo "delayed $delayed: $("$celer" status "$delayed" | grep '"state"')"
sleep 2.5
"$celer" status "$delayed" | grep -E '"(state|sum)"'
echo "cancelled $cancelled: $("$celer" status "$cancelled" | grep '"state"')"

say "hot reload: a hostile plugin dropped in while serving, then run"
install_plugin hostile "$root/tests/plugins/hostile"
for _ in $(seq 1 50); do grep -q 'plugin loaded.*hostile' "$work/serve.log" && break; sleep 0.1; done
for task in hostile.loop hostile.alloc hostile.panic; do
  printf '%-14s → ' "$task"
  { "$celer" enqueue "$task" --max-retries 0 --wait --timeout 30s || true; } | grep -E '"kind"|"message"' | tr -d '\n' | tr -s ' '
  echo
done

say "bad input gets one clear line and exit 2"
"$celer" enqueue hello.greet --args '[1,' || echo "(exit $?)"
"$celer" enqueue no.such.task || echo "(exit $?)"

say "the dead letters"
"$celer" dead list | grep -E '"(task|kind)"'

say "the host kept serving"
"$celer" enqueue hello.greet --kwargs '{"name":"after all that"}' --wait | grep '"message"'

say "SIGTERM: graceful stop"
kill -TERM "$server"; wait "$server" || true; server=""
tail -n 3 "$work/serve.log"
