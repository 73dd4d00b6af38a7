# S3: s3s-fs, an S3-compatible server over a directory, on CELER_TEST_S3_PORT.
# Chosen because it checks what real S3 checks — SigV4 signatures (a wrong
# secret is refused) and presigned-URL expiry — where a permissive mock
# (moto) accepts anything, so a test that passes here means the requests are
# really signed. 0.14.1 is the newest that builds with rustc 1.95. Installed
# once with cargo (about 85 s) into a cache outside the work tree, so fresh
# clones and CI runs on the same machine reuse it.
s3_bin() {
  if command -v s3s-fs >/dev/null 2>&1; then command -v s3s-fs; return; fi
  echo "${CELER_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/celer-tools}/s3s-fs-0.14.1/bin/s3s-fs"
}
s3_ping() { curl -s -o /dev/null --max-time 2 "$CELER_TEST_S3_ENDPOINT/" 2>/dev/null; }
s3_up() {
  local bin dir; bin="$(s3_bin)"; dir="$SERVICES_DIR/s3"
  if [ ! -x "$bin" ]; then
    echo "services: installing s3s-fs 0.14.1 (cargo install, about 90 s, once)" >&2
    cargo install s3s-fs@0.14.1 --locked --features binary --root "$(dirname "$(dirname "$bin")")" --quiet \
      || { echo "services: cargo install s3s-fs failed" >&2; return 1; }
  fi
  mkdir -p "$dir/data/$CELER_TEST_S3_BUCKET"
  if s3_ping; then return 0; fi
  # A fresh start begins with an empty bucket.
  rm -rf "${dir:?}/data"; mkdir -p "$dir/data/$CELER_TEST_S3_BUCKET"
  nohup "$bin" --host 127.0.0.1 --port "$CELER_TEST_S3_PORT" \
    --access-key "$CELER_TEST_S3_ACCESS_KEY" --secret-key "$CELER_TEST_S3_SECRET_KEY" \
    "$dir/data" >"$dir/s3s-fs.log" 2>&1 </dev/null &
  echo $! >"$dir/s3s-fs.pid"
  for _ in $(seq 1 100); do s3_ping && return 0; sleep 0.1; done
  echo "services: s3s-fs did not start; see $dir/s3s-fs.log" >&2; return 1
}
s3_down() {
  local pidfile="$SERVICES_DIR/s3/s3s-fs.pid"
  if [ -f "$pidfile" ]; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  fi
}
s3_status() {
  local pidfile="$SERVICES_DIR/s3/s3s-fs.pid"
  if s3_ping; then
    echo "s3       up    $CELER_TEST_S3_ENDPOINT (bucket $CELER_TEST_S3_BUCKET, data $SERVICES_DIR/s3/data)"
  else
    echo "s3       down"
  fi
}
