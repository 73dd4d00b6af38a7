# PostgreSQL 15: a private cluster under $SERVICES_DIR/postgres (owned by the
# `postgres` OS user: the server refuses to run as root), listening on
# 127.0.0.1:CELER_TEST_PG_PORT only, with a role `celer` (password `celer`,
# CREATEROLE: the host creates one role per plugin) owning the database
# `celer_test` — CELER_TEST_DATABASE_URL. fsync is off: test data only.
# Uses Debian's postgresql-15 (installed when missing).
CELER_TEST_PG_BIN="${CELER_TEST_PG_BIN:-/usr/lib/postgresql/15/bin}"

postgres_run() { # as the postgres OS user when we are root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

postgres_ready() {
  "$CELER_TEST_PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$CELER_TEST_PG_PORT" >/dev/null 2>&1
}

postgres_up() {
  if [ ! -x "$CELER_TEST_PG_BIN/initdb" ]; then
    echo "services: installing postgresql-15" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15 >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15 >/dev/null; }
  fi
  # The database tests create their SQLite schema with the sqlite3 shell.
  if ! command -v sqlite3 >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q sqlite3 >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q sqlite3 >/dev/null; }
  fi
  local dir="$SERVICES_DIR/postgres"
  local data="$dir/data"
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
  if [ ! -f "$data/PG_VERSION" ]; then
    echo "services: initdb $data" >&2
    postgres_run "$CELER_TEST_PG_BIN/initdb" -D "$data" -U postgres -A trust --no-sync -E UTF8 --locale C >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; return 1; }
  fi
  # A server that was killed leaves its lock file and, for a few seconds,
  # backends that still hold it: the start is refused until they are gone,
  # so it is tried again a few times.
  local attempt
  for attempt in 1 2 3 4 5; do
    postgres_ready && break
    postgres_run "$CELER_TEST_PG_BIN/pg_ctl" -D "$data" -l "$dir/postgres.log" -w -t 60 start \
      -o "-h 127.0.0.1 -p $CELER_TEST_PG_PORT -k '' -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" >/dev/null 2>&1 \
      && break
    if [ "$attempt" = 5 ]; then tail -n 20 "$dir/postgres.log" >&2; return 1; fi
    sleep 2
  done
  for _ in $(seq 1 100); do postgres_ready && break; sleep 0.1; done
  postgres_ready || { echo "services: postgres did not start; see $dir/postgres.log" >&2; return 1; }
  local psql=("$CELER_TEST_PG_BIN/psql" -h 127.0.0.1 -p "$CELER_TEST_PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qAt)
  if [ "$("${psql[@]}" -d postgres -c "SELECT 1 FROM pg_roles WHERE rolname = 'celer'")" != 1 ]; then
    "${psql[@]}" -d postgres -c "CREATE ROLE celer LOGIN CREATEROLE PASSWORD 'celer'" >/dev/null
  fi
  if [ "$("${psql[@]}" -d postgres -c "SELECT 1 FROM pg_database WHERE datname = 'celer_test'")" != 1 ]; then
    "${psql[@]}" -d postgres -c "CREATE DATABASE celer_test OWNER celer" >/dev/null
  fi
}

postgres_down() {
  local data="$SERVICES_DIR/postgres/data"
  if [ -f "$data/postmaster.pid" ]; then
    postgres_run "$CELER_TEST_PG_BIN/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
  fi
}

postgres_status() {
  if postgres_ready; then echo "postgres up    $CELER_TEST_DATABASE_URL"; else echo "postgres down"; fi
}
