# Redis: Debian's redis-server, no persistence, on CELER_TEST_REDIS_PORT.
redis_up() {
  if ! command -v redis-server >/dev/null; then
    echo "services: installing redis-server" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server redis-tools >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server redis-tools >/dev/null; }
  fi
  if redis-cli -p "$CELER_TEST_REDIS_PORT" ping >/dev/null 2>&1; then return 0; fi
  mkdir -p "$SERVICES_DIR/redis"
  redis-server --port "$CELER_TEST_REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --pidfile "$SERVICES_DIR/redis/redis.pid" --logfile "$SERVICES_DIR/redis/redis.log" \
    --dir "$SERVICES_DIR/redis"
  for _ in $(seq 1 50); do redis-cli -p "$CELER_TEST_REDIS_PORT" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "services: redis did not start; see $SERVICES_DIR/redis/redis.log" >&2; return 1
}
redis_down() { redis-cli -p "$CELER_TEST_REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true; }
redis_status() {
  if redis-cli -p "$CELER_TEST_REDIS_PORT" ping >/dev/null 2>&1; then echo "redis    up    $CELER_TEST_REDIS_URL"; else echo "redis    down"; fi
}
