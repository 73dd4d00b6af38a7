#!/usr/bin/env bash
# celer on the Redis broker beside Celery 5.7 on the same Redis, in one run:
# noop and light-JSON jobs/s (backlog, live) and enqueue→start p50/p99, and
# the ratios celer/Celery against Celery as installed (prefork ×2) and
# against Celery's best configuration here (2 solo workers); see
# ../shared/bench/README.md for how the Celery side measures.
#
#   scripts/bench-redis.sh            (make bench runs it)
#   BENCH_N=20000 BENCH_M=500 BENCH_TASKS="noop json_transform" BENCH_CELERY=0|1 BENCH_CELER_SHARDS="2 1"
#   BENCH_REPEAT=3: celer's runs (its variants interleaved) and then Celery's
#   tuned one are repeated, and the run with the median backlog rate is
#   reported (its live and latency figures are that run's), with the spread
#   of the backlog rates: one run on this machine moves by ±20 %.
#
# Its own Redis on BENCH_REDIS_PORT (6399, as the Celery bench), no
# persistence; stopped afterwards if this script started it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
port=${BENCH_REDIS_PORT:-6399}
url="redis://127.0.0.1:$port/0"
n=${BENCH_N:-10000}
repeat=${BENCH_REPEAT:-3}
m=${BENCH_M:-300}
tasks=${BENCH_TASKS:-"noop json_transform"}
celery_bench="${CELERY_BENCH_DIR:-$root/../shared/bench/celery}"
work=$(mktemp -d)
started_redis=0
cleanup() {
  [ "$started_redis" = 1 ] && redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

if ! redis-cli -p "$port" ping >/dev/null 2>&1; then
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --pidfile "$work/redis.pid" --logfile "$work/redis.log" --dir "$work" >/dev/null
  started_redis=1
  for _ in $(seq 1 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

mkdir -p "$work/plugins"
cp target/wasm32-wasip2/release/bench.wasm "$work/plugins/bench.wasm"
cp tests/plugins/bench/celer-plugin.toml "$work/plugins/bench.toml"
cargo bench -p celer --bench redis_throughput --no-run >&2 2>/dev/null || cargo bench -p celer --bench redis_throughput --no-run >&2

results="$work/results.jsonl"
# celer's worker tuned for short jobs, `[worker] shards` = the cores (each
# shard on a thread of its own with its own Redis connection), and as
# `celer serve` runs it by default (one loop on a 2-thread runtime).
for run in $(seq 1 "$repeat"); do
  for task in $tasks; do
    for shards in ${BENCH_CELER_SHARDS:-$(nproc) 1}; do
      echo "== celer on Redis: $task (release build, in-process producer + host, concurrency 32, worker shards: $shards), run $run of $repeat ==" >&2
      export BENCH_SHARDS=$shards
      BENCH_THREADS=2 env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE cargo bench -q -p celer --bench redis_throughput -- "$work/plugins" "$url" --task "$task" --n "$n" --m "$m" | tail -1 | tee -a "$results"
    done
  done
done
unset BENCH_SHARDS

if [ "${BENCH_CELERY:-1}" = 1 ] && [ -f "$celery_bench/run.py" ]; then
  scripts/services.sh up celery >&2
  py="$root/target/services/celery-venv/bin/python"
  for task in $tasks; do
    echo "== Celery 5.7: $task, prefork x2 (as installed) ==" >&2
    "$py" "$celery_bench/run.py" --task "$task" --n "$n" --m "$m" --redis-url "$url" 2>/dev/null | tail -1 | tee -a "$results"
    for run in $(seq 1 "$repeat"); do
      echo "== Celery 5.7: $task, 2 solo workers (its best here), run $run of $repeat ==" >&2
      "$py" "$celery_bench/run.py" --task "$task" --n "$n" --m "$m" --redis-url "$url" --pool solo --workers 2 2>/dev/null | tail -1 | tee -a "$results"
    done
  done
else
  echo "(Celery side skipped: BENCH_CELERY=0 or $celery_bench/run.py missing)" >&2
fi

ceiling="$root/../shared/bench/redis-ceiling.sh"
if [ -x "$ceiling" ]; then
  # The raw broker on this machine today: what one client reaches, one
  # command per round trip and pipelined (the loopback's speed varies from
  # day to day, and it bounds Celery's per-message round trips).
  echo "== Redis ceiling on this machine now (redis-benchmark, 1 client and 50) ==" >&2
  for clients in 1 50; do
    REDIS_PORT=$port CLIENTS=$clients REQUESTS=$((clients == 1 ? 50000 : 200000)) "$ceiling" 2>/dev/null |
      tail -1 | python3 -c 'import json,sys; r=json.load(sys.stdin); r.update(system="redis", bench="redis_ceiling"); print(json.dumps(r))' |
      tee -a "$results" || true
  done
fi

python3 - "$results" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
def pick(system, task, **kw):
    """The median run (by backlog jobs/s) of those that match, with the
    spread of their backlog rates."""
    runs = sorted((r for r in rows if r["system"] == system and r["task"] == f"bench.{task}" and all(r.get(k) == v for k, v in kw.items())),
                  key=lambda r: r["backlog_per_s"])
    if not runs:
        return None
    median = dict(runs[(len(runs) - 1) // 2])
    median["runs"] = len(runs)
    median["backlog_spread"] = [runs[0]["backlog_per_s"], runs[-1]["backlog_per_s"]]
    return median

def spread(r):
    lo, hi = r["backlog_spread"]
    return f" (median of {r['runs']} runs, {lo:.0f}–{hi:.0f})" if r["runs"] > 1 else ""
print("\n== celer on Redis vs Celery 5.7 on the same Redis (ratios: celer / Celery) ==", file=sys.stderr)
celer_rows = [r for r in rows if r["system"] == "celer"]
for task, shards in [(t, n) for t in ["noop", "json_transform"] for n in sorted({r["worker_shards"] for r in celer_rows}, reverse=True)]:
    c = pick("celer", task, worker_shards=shards)
    if not c:
        continue
    print(f"{task} ({shards} worker shard{'s' if shards > 1 else ''}): celer backlog {c['backlog_per_s']:.0f}/s{spread(c)}, live {c['live_per_s']:.0f}/s "
          f"(32 producers {c['live_32_producers_per_s']:.0f}/s), start p50 {c['start_p50_ms']} ms p99 {c['start_p99_ms']} ms", file=sys.stderr)
    # Where the time goes in the backlog phase (CPU per job on each side).
    cmds = c.get("backlog_redis_commands", [])
    scripts = sum(x["us_per_job"] for x in cmds if x["command"] in ("evalsha", "eval"))
    top = ", ".join(f"{x['command']} {x['us_per_job']}" for x in cmds if x["command"] not in ("evalsha", "eval"))
    print(f"  CPU per job: host {c.get('backlog_host_cpu_us_per_job')} µs, Redis {c.get('backlog_redis_cpu_us_per_job')} µs "
          f"(scripts {scripts:.1f} µs; per command, those the scripts run included, µs: {top})", file=sys.stderr)
    for ceiling in [r for r in rows if r.get("bench") == "redis_ceiling"]:
        print(f"  vs the raw Redis ceiling ({ceiling['clients']} client(s)): XADD {ceiling['xadd_p1']:.0f}/s unpipelined, "
              f"{ceiling['xadd_p16']:.0f}/s at -P 16; celer backlog = {c['backlog_per_s'] / ceiling['xadd_p1']:.2f}x "
              f"that unpipelined XADD rate", file=sys.stderr)
    for label, peer in [("prefork x2 (as installed)", pick("celery", task, pool="prefork")),
                        ("2 solo workers (tuned)", pick("celery", task, pool="solo", workers=2))]:
        if not peer:
            continue
        ratio = {
            "bench": f"redis_vs_celery_{task}", "against": label, "celer_worker_shards": shards,
            "backlog_ratio": round(c["backlog_per_s"] / peer["backlog_per_s"], 2),
            "live_ratio": round(c["live_per_s"] / peer["live_per_s"], 2),
            "start_p50_ratio": round(peer["start_p50_ms"] / max(c["start_p50_ms"], 1e-6), 2),
            "celer_backlog_per_s": c["backlog_per_s"], "celery_backlog_per_s": peer["backlog_per_s"],
            "celer_live_per_s": c["live_per_s"], "celery_live_per_s": peer["live_per_s"],
            "celer_start_p50_ms": c["start_p50_ms"], "celery_start_p50_ms": peer["start_p50_ms"],
            "celer_start_p99_ms": c["start_p99_ms"], "celery_start_p99_ms": peer["start_p99_ms"],
            "goal_backlog_ratio_vs_tuned": 15,
            "celer_runs": c["runs"], "celer_backlog_spread": c["backlog_spread"],
            "celery_runs": peer["runs"], "celery_backlog_spread": peer["backlog_spread"],
        }
        print(f"  vs Celery {label}{spread(peer)}: {peer['backlog_per_s']:.0f}/s, backlog x{ratio['backlog_ratio']}, live x{ratio['live_ratio']}, "
              f"start p50 {peer['start_p50_ms']} ms vs {c['start_p50_ms']} ms", file=sys.stderr)
        print(json.dumps(ratio))
EOF
