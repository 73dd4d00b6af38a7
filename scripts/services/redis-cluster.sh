# A 3-node Redis Cluster on loopback (no replicas, no persistence) for the
# Redis broker's cluster tests: ports CELER_TEST_REDIS_CLUSTER_PORTS.
redis_cluster_ports() { echo 7101 7102 7103; }
redis-cluster_up() {
  command -v redis-server >/dev/null || redis_up   # installs redis-server (redis.sh)
  local dir="$SERVICES_DIR/redis-cluster" nodes=() p
  mkdir -p "$dir"
  for p in $(redis_cluster_ports); do
    nodes+=("127.0.0.1:$p")
    redis-cli -p "$p" ping >/dev/null 2>&1 && continue
    mkdir -p "$dir/$p"
    redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no --cluster-enabled yes \
      --cluster-config-file "$dir/$p/nodes.conf" --cluster-node-timeout 2000 --daemonize yes \
      --pidfile "$dir/$p/redis.pid" --logfile "$dir/$p/redis.log" --dir "$dir/$p"
  done
  for p in $(redis_cluster_ports); do
    for _ in $(seq 1 50); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done
  done
  if ! redis-cli -p 7101 cluster info 2>/dev/null | grep -q 'cluster_state:ok'; then
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
    for _ in $(seq 1 100); do redis-cli -p 7101 cluster info | grep -q 'cluster_state:ok' && break; sleep 0.1; done
  fi
  redis-cli -p 7101 cluster info | grep -q 'cluster_state:ok' || { echo "services: redis cluster did not form; see $dir/*/redis.log" >&2; return 1; }
}
redis-cluster_down() {
  local p
  for p in $(redis_cluster_ports); do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done
  rm -rf "$SERVICES_DIR/redis-cluster"
}
redis-cluster_status() {
  if redis-cli -p 7101 cluster info 2>/dev/null | grep -q 'cluster_state:ok'; then
    echo "redis-cluster up    redis+cluster://127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
  else echo "redis-cluster down"; fi
}
