#!/usr/bin/env bash
# The export benchmark (issue: "Export of an organization with 1 M rows in
# all"): `export.organization` on a release `celer serve`, beside the Python
# reference (examples/bench/export_reference.py: psycopg or sqlite3 + json +
# zipfile) on the same data, in the same run. Prints one JSON line per figure.
#
#   scripts/bench-export.sh                      # 1 000 000 rows, embedded SQLite (+ PostgreSQL when reachable)
#   BENCH_EXPORT_ROWS=100000 scripts/bench-export.sh
#   BENCH_DATABASE_URL=postgres://… scripts/bench-export.sh   # PostgreSQL: a database the script may fill
#
# Figures: rows/s (job start to finish, as the job's status reports it), the
# host's peak RSS (VmHWM of the `celer serve` process, which also holds the
# compiled plugin and the database pools), and the plugin's memory: the
# smallest `limits.memory_mb` of 8, 16, 32, 64 under which the export still
# succeeds (the sandbox refuses any growth past it). Goals: plugin ≤ 64 MiB
# whatever the size, ≥ 50 000 rows/s, faster than the Python reference.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
rows=${BENCH_EXPORT_ROWS:-1000000}
now=2026-11-22T12:00:00Z
celer="$root/target/release/celer"
wasm="$root/target/wasm32-wasip2/release"
work=$(mktemp -d "${TMPDIR:-/tmp}/celer-bench-export.XXXXXX")
drop_db=""   # the PostgreSQL database this script made, dropped at the end
cleanup() {
  set +e
  for pid in "$work"/run-*/pid; do [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null; done
  wait 2>/dev/null
  [ -n "$drop_db" ] && psql "$admin" -qc "DROP DATABASE IF EXISTS $drop_db WITH (FORCE)" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

[ -x "$celer" ] || { echo "bench-export: building the release host" >&2; cargo build --release -q -p celer --bin celer; }
[ -f "$wasm/export.wasm" ] || { echo "bench-export: run make plugins first" >&2; exit 2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# run_celer LABEL MEMORY_MB DATA_DIR [DATABASE_URL] → one JSON line (or a failure line)
run_celer() {
  local label=$1 memory=$2 data=$3 url=${4:-}
  local dir="$work/run-$label-$memory" port
  port=$(free_port)
  mkdir -p "$dir"
  "$root/examples/install_plugins.sh" "$dir/plugins" export email 2>/dev/null
  sed -i "s/^memory_mb = .*/memory_mb = $memory/" "$dir/plugins/export.toml"
  (
    cd "$dir"
    export CELER_DATA_DIR="$data" CELER_PLUGINS_DIR="$dir/plugins" CELER_LISTEN="127.0.0.1:$port" CELER_LOG=warn
    if [ -n "$url" ]; then export DATABASE_URL="$url"; else unset DATABASE_URL; fi
    "$celer" serve --roles worker,api 2>"$dir/serve.log" &
    echo $! >"$dir/pid"
    for _ in $(seq 1 300); do
      curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
      sleep 0.1
    done
    local pid; pid=$(cat "$dir/pid")
    local rss_before; rss_before=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    "$celer" enqueue export.organization --args '[1, 1]' --max-retries 0 --wait --timeout 1800s >"$dir/status.json" 2>"$dir/enqueue.err" || true
    local hwm; hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    python3 - "$dir/status.json" "$label" "$memory" "$rss_before" "$hwm" <<'PY'
import datetime as dt, json, sys
path, label, memory, before, hwm = sys.argv[1:]
try:
    s = json.load(open(path))
except Exception as e:
    print(json.dumps({"bench": "export", "backend": label, "memory_mb": int(memory), "state": "no status", "error": str(e)}))
    sys.exit(0)
out = {"bench": "export", "backend": label, "memory_mb": int(memory), "state": s["state"]}
if s["state"] == "succeeded":
    t = lambda k: dt.datetime.fromisoformat(s[k].replace("Z", "+00:00"))
    secs = (t("finished_at") - t("started_at")).total_seconds()
    rows = s["result"]["rows"]
    out.update(rows=rows, seconds=round(secs, 3), rows_per_s=round(rows / secs), zip_bytes=s["result"]["size_bytes"],
               host_rss_before_mib=round(int(before) / 1024, 1), host_peak_rss_mib=round(int(hwm) / 1024, 1))
else:
    out["error"] = s.get("error")
print(json.dumps(out))
PY
  )
}

# smallest_limit LABEL DATA_DIR [URL]: the smallest memory_mb of 8, 16, 32, 64 that succeeds
run_limit() { run_celer "$1" "$4" "$2" "${3:-}"; }
smallest_limit() {
  for m in 8 16 32 64; do
    local line; line=$(run_limit "$1" "$2" "${3:-}" "$m")
    case "$line" in *'"state": "succeeded"'*) echo "{\"bench\": \"export\", \"backend\": \"$1\", \"plugin_memory_mb_at_most\": $m, \"goal_mb\": 64}"; return;; esac
  done
  echo "{\"bench\": \"export\", \"backend\": \"$1\", \"plugin_memory_mb_at_most\": null, \"note\": \"failed even at 64 MiB\"}"
}

echo "== export.organization: $rows rows in one organization (release host), beside the Python reference ==" >&2

# ---- SQLite (the embedded default)
mkdir -p "$work/sqlite"
python3 examples/gen_demo_data.py --sqlite "$work/sqlite/celer.db" --orgs 1 --rows-per-org "$rows" --now "$now" 2>/dev/null
run_celer sqlite 64 "$work/sqlite"
smallest_limit sqlite "$work/sqlite"
python3 examples/bench/export_reference.py --sqlite "$work/sqlite/celer.db" --org 1 --user 1 --out "$work/reference.zip" \
  | sed 's/^{/{"bench": "export-python-reference", /'

# ---- PostgreSQL, when one is given or the test service is up
url=${BENCH_DATABASE_URL:-}
if [ -z "$url" ] && [ -f scripts/services/ports.sh ]; then
  # shellcheck source=services/ports.sh
  source scripts/services/ports.sh
  if psql "$CELER_TEST_DATABASE_URL" -qAtc 'SELECT 1' >/dev/null 2>&1; then
    admin="postgres://postgres@127.0.0.1:${CELER_TEST_PG_PORT}/postgres"
    psql "$admin" -qc "DROP DATABASE IF EXISTS celer_bench_export WITH (FORCE)" -c "CREATE DATABASE celer_bench_export OWNER celer" >/dev/null 2>&1 \
      && url="${CELER_TEST_DATABASE_URL%/*}/celer_bench_export" && drop_db=celer_bench_export
  fi
fi
if [ -n "$url" ]; then
  python3 examples/gen_demo_data.py --postgres --orgs 1 --rows-per-org "$rows" --now "$now" --reset 2>/dev/null \
    | psql "$url" -q -v ON_ERROR_STOP=1 >/dev/null
  psql "$url" -qc "ANALYZE users, memberships, organizations, contacts, images, image_relations, tags, tag_relations, events, event_attendees" >/dev/null
  mkdir -p "$work/pg"
  run_celer postgres 64 "$work/pg" "$url"
  smallest_limit postgres "$work/pg" "$url"
  venv="$root/target/bench-venv"
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import psycopg' 2>/dev/null; then
    python3 -m venv "$venv" >/dev/null && "$venv/bin/pip" install -q "psycopg[binary]" >/dev/null 2>&1 || true
  fi
  if "$venv/bin/python" -c 'import psycopg' 2>/dev/null; then
    "$venv/bin/python" examples/bench/export_reference.py --postgres "$url" --org 1 --user 1 --out "$work/reference-pg.zip" \
      | sed 's/^{/{"bench": "export-python-reference", /'
  else
    echo '{"bench": "export-python-reference", "backend": "postgres", "note": "psycopg could not be installed"}'
  fi
else
  echo '{"bench": "export", "backend": "postgres", "note": "no PostgreSQL: set BENCH_DATABASE_URL or scripts/services.sh up postgres"}'
fi
