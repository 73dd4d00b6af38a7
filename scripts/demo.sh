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

# ==== seed jobs: every first-party plugin end to end (docs/seeds.md) ========
# The six plugins are dropped in while serving (their default schedules are
# created as they load), then the demo schema and data go into the embedded
# SQLite file, and each seed task runs once, then once more to show that a
# second run changes nothing.
seed_task() { # TASK [ARGS-JSON]: runs it, prints state and result on one line
  local out
  out=$("$celer" enqueue "$1" --args "${2:-[]}" --max-retries 0 --wait --timeout 120s 2>&1) || true
  printf '%-48s → %s\n' "$1 ${2:-}" "$(printf '%s' "$out" | python3 -c '
import json, sys
try:
    s = json.load(sys.stdin)
except ValueError:
    print("no status"); sys.exit()
r = s.get("result")
if isinstance(r, dict):
    r = {k: v for k, v in r.items() if k not in ("url", "window_start", "window_end", "before", "keys", "message_id",
                                          "codes_used_before", "totp_created_before", "expires_at")}
print(s["state"], json.dumps(r if s["state"] == "succeeded" else s.get("error"), sort_keys=True))')"
}
sql() { python3 -c 'import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=30); print("\n".join("|".join(map(str, r)) for r in c.execute(sys.argv[2])))' "$work/celer-data/celer.db" "$1"; }

say "seed plugins: email, export, cleanup, events, audit, permissions (hot-loaded)"
"$root/examples/install_plugins.sh" "$work/plugins"
for p in email export cleanup events audit permissions; do
  for _ in $(seq 1 100); do grep -q "plugin loaded.*plugin=\"$p\"" "$work/serve.log" && break; sleep 0.1; done
done
sleep 1   # the scheduler creates the manifests' default schedules
"$celer" plugins 2>/dev/null | grep -E '^(email|export|cleanup|events|audit|permissions) '
"$celer" schedules list

say "demo schema and data (examples/gen_demo_data.py) into the embedded SQLite file"
python3 "$root/examples/gen_demo_data.py" --sqlite "$work/celer-data/celer.db" --orgs 2 --rows-per-org 200
# A stored file for every image, so that the orphan cleanup has objects to delete.
sql "SELECT storage_key FROM images" | while read -r key; do
  mkdir -p "$(dirname "$work/celer-data/storage/$key")"; printf 'jpeg' >"$work/celer-data/storage/$key"
done
echo "events by status: $(sql "SELECT status || ' ' || count(*) FROM events GROUP BY status" | paste -sd, -)"

say "events: complete the ended, archive the old, remind the attendees of the next 24 h"
seed_task apps.events.tasks.mark_ended_events_as_completed
seed_task events.archive_completed
seed_task events.send_reminders
echo "events by status: $(sql "SELECT status || ' ' || count(*) FROM events GROUP BY status" | paste -sd, -)"

say "export: organization 1 for its owner; the link downloads from the host"
export_out=$("$celer" enqueue export.organization --args '[1, 1]' --wait --timeout 120s)
printf '%s' "$export_out" | python3 -c '
import json, sys
s = json.load(sys.stdin); r = s["result"]
print(s["state"], "-", r["rows"], "rows,", r["size_bytes"], "bytes, progress", s["progress"], "\n tables", json.dumps(r["tables"], sort_keys=True), "\n link", r["url"][:90] + "…")'
url=$(printf '%s' "$export_out" | python3 -c 'import json, sys; print(json.load(sys.stdin)["result"]["url"])')
curl -sf -o "$work/export.zip" "$url" && python3 -c '
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
print(" downloaded:", ", ".join(f"{i.filename} ({i.file_size} B)" for i in z.infolist()))' "$work/export.zip"
seed_task export.organization '[1, 3]'
echo "data_exports: $(sql "SELECT count(*) FROM data_exports") rows"

say "cleanup: orphan images (and their files), orphan tags, stale MFA data, expired exports"
seed_task cleanup.orphan_images
seed_task cleanup.orphan_tags
seed_task modules.auth.accounts.tasks.clean_mfa_data
seed_task cleanup.expired_exports

say "audit log, permission cache, email"
seed_task modules.auth.accounts.tasks.log_auth_event_task '[1, "login", "192.0.2.10", "curl/8", {"os": "Linux"}, true, {"method": "password"}]'
seed_task audit.log_auth_event '[424242, "login_failed", "192.0.2.11"]'
seed_task permissions.invalidate '[1, 1]'
seed_task modules.auth.accounts.tasks.send_welcome_email '[3]'
seed_task email.send '["password_reset", "someone@example.org", null, {"reset_url": "https://app.example.com/reset/abc"}, "de"]'
sleep 1
echo "the outbox ($work/celer-data/outbox):"
python3 - "$work/celer-data/outbox" <<'PY'
import email, email.header, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.eml")):
    m = email.message_from_bytes(f.read_bytes())
    subject = str(email.header.make_header(email.header.decode_header(m["Subject"])))
    parts = "+".join(p.get_content_subtype() for p in m.walk() if not p.is_multipart())
    print(f"  {m['To'][:44]:<44} {subject}  [{parts}]")
PY

say "every scheduled task once more: nothing left to do"
for t in events.complete_ended events.archive_completed events.send_reminders cleanup.orphan_images \
         cleanup.orphan_tags cleanup.mfa cleanup.expired_exports; do seed_task "$t"; done
# ==== end of the seed jobs section ==========================================

say "SIGTERM: graceful stop"
kill -TERM "$server"; wait "$server" || true; server=""
tail -n 3 "$work/serve.log"
