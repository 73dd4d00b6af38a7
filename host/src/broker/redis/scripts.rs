//! The Lua scripts of the Redis broker. Every state change of a job runs in
//! one script, so it is atomic: no other client sees half of it, and two
//! hosts can never both take the same job.
//!
//! Each script touches the keys of one queue only (they share the hash tag
//! `{queue}`, see [`super::keys`]), so it runs on Redis Cluster too. Job
//! hashes are named inside the scripts from the queue prefix (`ARGV[1]`),
//! as BullMQ does: their names are only known once a stream entry is read.
//!
//! Times: `now` is the Redis server's clock (`TIME`), so that hosts with
//! skewed clocks agree on lease deadlines. Deadlines and run times are in
//! ms; started/finished/enqueued stamps in µs (the benchmark measures
//! sub-millisecond latencies from them). Numbers are written with
//! `string.format('%d')`: Lua would print big ones as `1.7e+15`.

/// Shared helpers, prepended to every script. `ARGV[1]` is always the
/// queue's key prefix (`celer:{q}:`) and `ARGV[2]` the consumer group.
const PRELUDE: &str = r#"
local P = ARGV[1]
local G = ARGV[2]
local function S(n) return string.format('%d', n) end
local T = redis.call('TIME')
local NOW = tonumber(T[1]) * 1000 + math.floor(tonumber(T[2]) / 1000)
local NOW_US = T[1] .. string.format('%06d', tonumber(T[2]))
local function jkey(id) return P .. 'j:' .. id end
local function skey(prio) return P .. 's:' .. prio end
-- Appends a job id to the stream of its priority; creates stream and group
-- on first use (also after a Redis restart without persistence).
-- The consumer group is created by the first fetch (at id 0, so it sees
-- every entry added before). Priority 0 is always read; others are listed
-- in `prios`.
local function push(prio, id)
  local sk = skey(prio)
  if prio ~= '0' then redis.call('ZADD', P .. 'prios', tonumber(prio), prio) end
  local eid = redis.call('XADD', sk, '*', 'id', id)
  return sk, eid
end
-- The priorities to read, highest first, 0 included.
local function priorities()
  local out, zero = {}, false
  for _, p in ipairs(redis.call('ZREVRANGE', P .. 'prios', 0, -1)) do
    if not zero and tonumber(p) < 0 then out[#out + 1] = '0'; zero = true end
    if p == '0' then zero = true end
    out[#out + 1] = p
  end
  if not zero then out[#out + 1] = '0' end
  return out
end
-- Runs `cmd key args…` for a list of arguments, in chunks small enough for
-- Lua's stack (`unpack` of thousands of values fails): one command per
-- batch of jobs instead of one per job.
local function bulk(cmd, key, args, prefix)
  for i = 1, #args, 2000 do
    local part = {}
    if prefix then for _, a in ipairs(prefix) do part[#part + 1] = a end end
    for j = i, math.min(i + 1999, #args) do part[#part + 1] = args[j] end
    redis.call(cmd, key, unpack(part))
  end
end
-- Acks and deletes the job's current stream entry, if any.
local function drop_entry(jk)
  local e = redis.call('HMGET', jk, 'sk', 'eid')
  if e[1] and e[2] then
    redis.call('XACK', e[1], G, e[2])
    redis.call('XDEL', e[1], e[2])
  end
  redis.call('HDEL', jk, 'sk', 'eid')
end
-- The job hash (and its idempotency key) expire a while after it finished.
local function expire(jk, ttl)
  redis.call('EXPIRE', jk, ttl)
  local ik = redis.call('HGET', jk, 'idem')
  if ik then redis.call('EXPIRE', ik, ttl) end
end
-- Terminal states that are not the outcome of a run.
local function finish(jk, id, state, kind, message, ttl)
  redis.call('HSET', jk, 'state', state, 'fin', NOW_US)
  redis.call('HDEL', jk, 'tok', 'lu')
  if kind then redis.call('HSET', jk, 'ek', kind, 'em', message) end
  if state == 'failed' then
    local did = redis.call('XADD', P .. 'dead', '*', 'id', id)
    redis.call('HSET', jk, 'dead', NOW_US, 'dk', did)
    redis.call('PERSIST', jk)
  else
    expire(jk, ttl)
  end
end
"#;

/// KEYS: job hash, delayed zset, idempotency key (or the job hash again).
/// ARGV: 3 id, 4 envelope JSON, 5 task, 6 priority, 7 max_retries,
/// 8 expires_at ms or '', 9 eta ms or '', 10 '1' when keyed.
/// Returns {1, id} or {0, existing id}.
const ENQUEUE: &str = r#"
local id = ARGV[3]
if ARGV[10] == '1' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[3], id)
end
local run_at = tonumber(ARGV[9]) or NOW
local f = {'env', ARGV[4], 'task', ARGV[5], 'prio', ARGV[6], 'maxr', ARGV[7], 'exp', ARGV[8],
           'attempt', '0', 'enq', NOW_US, 'run_at', S(run_at)}
if ARGV[10] == '1' then table.insert(f, 'idem'); table.insert(f, KEYS[3]) end
if run_at > NOW then
  table.insert(f, 'state'); table.insert(f, 'scheduled')
  redis.call('ZADD', KEYS[2], run_at, id)
else
  local sk, eid = push(ARGV[6], id)
  table.insert(f, 'state'); table.insert(f, 'queued')
  table.insert(f, 'sk'); table.insert(f, sk); table.insert(f, 'eid'); table.insert(f, eid)
end
redis.call('HSET', KEYS[1], unpack(f))
return {1, id}
"#;

/// KEYS: prios, delayed, leases (all of one queue).
/// ARGV: 3 consumer (host), 4 max, 5 lease ms, 6 token prefix, 7 token
/// suffix ('.' .. queue), 8 result ttl s, 9 wait info wanted ('1'),
/// 10 number of excluded tasks, 11.. excluded tasks.
///
/// 1. due delayed jobs go onto their stream (or turn `expired`);
/// 2. running jobs whose lease ran out: `expired`, `cancelled` (stop was
///    requested), `failed`/`lost` (no retry left), or taken over by this
///    consumer as a new attempt (XCLAIM of their pending entry);
/// 3. XREADGROUP takes at most `max - taken` new entries, highest priority
///    stream first; stale entries (cancelled jobs) are dropped, entries of
///    excluded tasks go back to the end of their stream.
/// Returns {deliveries, wait}: deliveries = flat {id, env, attempt, token,
/// enq}; wait (only when nothing was delivered and it was asked for) =
/// {ms until the next delayed job or lease deadline or -1, stream, last id, …}.
const FETCH: &str = r#"
local C, max, lease, tokp, toks, ttl = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7], tonumber(ARGV[8])
local excluded = {}
for i = 11, 10 + tonumber(ARGV[10]) do excluded[ARGV[i]] = true end
local out, n = {}, 0
local LU = S(NOW + lease)
-- Deadlines of the jobs leased by this call, written with one ZADD at the end.
local deadlines = {}
local function lease_job(jk, id, attempt, env, enq)
  n = n + 1
  local tok = tokp .. n .. toks
  redis.call('HSET', jk, 'state', 'running', 'tok', tok, 'lu', LU, 'host', C, 'st', NOW_US, 'attempt', attempt)
  -- A fresh job has nothing of an earlier attempt to clear.
  if attempt ~= '0' then redis.call('HDEL', jk, 'fin', 'pd', 'pt') end
  deadlines[#deadlines + 1] = LU; deadlines[#deadlines + 1] = id
  out[#out + 1] = id; out[#out + 1] = env; out[#out + 1] = attempt; out[#out + 1] = tok; out[#out + 1] = enq
end

-- 1. promote due delayed jobs
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', NOW, 'LIMIT', 0, 1000)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[2], id)
  local jk = jkey(id)
  local f = redis.call('HMGET', jk, 'state', 'exp', 'prio')
  if f[1] == 'scheduled' or f[1] == 'retrying' then
    local exp = tonumber(f[2])
    if exp and exp < NOW then
      finish(jk, id, 'expired', nil, nil, ttl)
    else
      local sk, eid = push(f[3], id)
      redis.call('HSET', jk, 'state', 'queued', 'sk', sk, 'eid', eid)
    end
  end
end

-- 2. leases that ran out
local lost = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', NOW, 'LIMIT', 0, 1000)
for _, id in ipairs(lost) do
  local jk = jkey(id)
  local f = redis.call('HMGET', jk, 'state', 'lu', 'cancel', 'attempt', 'maxr', 'exp', 'task', 'env', 'enq', 'sk', 'eid')
  if f[1] ~= 'running' then
    redis.call('ZREM', KEYS[3], id)
  elseif tonumber(f[2]) > NOW then
    redis.call('ZADD', KEYS[3], tonumber(f[2]), id)
  else
    local exp = tonumber(f[6])
    if exp and exp < NOW then
      redis.call('ZREM', KEYS[3], id); drop_entry(jk); finish(jk, id, 'expired', nil, nil, ttl)
    elseif f[3] == '1' then
      redis.call('ZREM', KEYS[3], id); drop_entry(jk)
      finish(jk, id, 'cancelled', 'cancelled', 'cancelled while its host was gone', ttl)
    elseif tonumber(f[4]) + 1 > tonumber(f[5]) then
      redis.call('ZREM', KEYS[3], id); drop_entry(jk)
      finish(jk, id, 'failed', 'lost', 'lease expired on every attempt (host died?)', ttl)
    elseif n < max and not excluded[f[7]] then
      if f[10] and f[11] then pcall(redis.call, 'XCLAIM', f[10], G, C, 0, f[11], 'JUSTID') end
      lease_job(jk, id, S(tonumber(f[4]) + 1), f[8], f[9])
    end
  end
end

-- 3. new entries, highest priority first
local prios = priorities()
local deferred = {}
for _, p in ipairs(prios) do
  if n >= max then break end
  local sk = skey(p)
  while n < max do
    local want = max - n
    local ok, res = pcall(redis.call, 'XREADGROUP', 'GROUP', G, C, 'COUNT', want, 'STREAMS', sk, '>')
    if not ok then
      -- NOGROUP: the group is gone (flushed, or a restart): create it again.
      pcall(redis.call, 'XGROUP', 'CREATE', sk, G, '0', 'MKSTREAM')
      ok, res = pcall(redis.call, 'XREADGROUP', 'GROUP', G, C, 'COUNT', want, 'STREAMS', sk, '>')
      if not ok then
        -- Jobs already turned `running` by this call keep their deadlines,
        -- so they are taken back if nobody runs them.
        if #deadlines > 0 then bulk('ZADD', KEYS[3], deadlines) end
        return redis.error_reply(tostring(res.err or res))
      end
    end
    if not res then break end
    local entries = res[1][2]
    for _, e in ipairs(entries) do
      local eid, id = e[1], e[2][2]
      local jk = jkey(id)
      local f = redis.call('HMGET', jk, 'state', 'exp', 'task', 'env', 'enq', 'attempt', 'eid')
      if f[1] ~= 'queued' or f[7] ~= eid then
        redis.call('XACK', sk, G, eid); redis.call('XDEL', sk, eid)
      else
        local exp = tonumber(f[2])
        if exp and exp < NOW then
          drop_entry(jk); finish(jk, id, 'expired', nil, nil, ttl)
        elseif excluded[f[3]] then
          redis.call('XACK', sk, G, eid); redis.call('XDEL', sk, eid)
          deferred[#deferred + 1] = {sk, id, jk}
        else
          lease_job(jk, id, f[6], f[4], f[5])
        end
      end
    end
    if #entries < want then break end
  end
end
for _, d in ipairs(deferred) do
  local eid = redis.call('XADD', d[1], '*', 'id', d[2])
  redis.call('HSET', d[3], 'eid', eid)
end
if #deadlines > 0 then bulk('ZADD', KEYS[3], deadlines) end

local wait = {}
if n == 0 and ARGV[9] == '1' then
  local next_ms = -1
  local d = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if d[2] then next_ms = tonumber(d[2]) - NOW end
  local l = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  if l[2] and (next_ms < 0 or tonumber(l[2]) - NOW < next_ms) then next_ms = tonumber(l[2]) - NOW end
  wait[1] = S(next_ms)
  for _, p in ipairs(prios) do
    local ok, info = pcall(redis.call, 'XINFO', 'STREAM', skey(p))
    local last = '0-0'
    if ok then
      for i = 1, #info, 2 do if info[i] == 'last-generated-id' then last = info[i + 1] end end
    end
    wait[#wait + 1] = skey(p); wait[#wait + 1] = last
  end
end
return {out, wait}
"#;

/// KEYS: job hash, leases. ARGV: 3 token, 4 ttl ms, 5 id.
/// Returns -1 (lost), 0 (held) or 1 (held, stop requested).
const RENEW: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'state', 'tok', 'cancel')
if f[1] ~= 'running' or f[2] ~= ARGV[3] then return -1 end
local lu = NOW + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'lu', S(lu))
redis.call('ZADD', KEYS[2], lu, ARGV[5])
if f[3] == '1' then return 1 end
return 0
"#;

/// KEYS: job hash. ARGV: 3 token, 4 done, 5 total.
const PROGRESS: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'state', 'tok')
if f[1] ~= 'running' or f[2] ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'pd', ARGV[4], 'pt', ARGV[5])
return 1
"#;

/// Ends attempts, several per call (the broker batches concurrent
/// completions of one queue). KEYS: leases, delayed. ARGV: 3 result ttl s,
/// then per job 13 values: token, id, outcome (succeeded|retry|dead|
/// cancelled), result JSON, error kind, error message, retry at ms, and
/// the optional record fields as '' (absent) or '=' .. value: plugin,
/// plugin version, touched, log, progress done, progress total.
/// Returns per job 1 (recorded) or 0 (the lease was not held).
const COMPLETE: &str = r#"
local ttl = tonumber(ARGV[3])
local names = {'plugin', 'pv', 'touched', 'log', 'pd', 'pt'}
local out = {}
-- Stream entries to ack and delete (per stream) and leases to drop, each
-- written with one command for the whole batch.
local acks, ended = {}, {}
for base = 4, #ARGV - 12, 13 do
  local tok, id, kind, result, ek, em, at = ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4], ARGV[base + 5], ARGV[base + 6]
  local jk = jkey(id)
  local f = redis.call('HMGET', jk, 'state', 'tok', 'cancel', 'attempt', 'sk', 'eid', 'idem')
  if f[1] ~= 'running' or f[2] ~= tok then
    out[#out + 1] = 0
  else
    if kind == 'retry' and f[3] == '1' then
      kind = 'cancelled'; ek = 'cancelled'; em = 'cancelled; the last attempt failed: ' .. em
    end
    if f[5] and f[6] then
      local list = acks[f[5]]
      if not list then list = {}; acks[f[5]] = list end
      list[#list + 1] = f[6]
    end
    ended[#ended + 1] = id
    -- The lease fields stay (the state says they are void); `sk`/`eid`
    -- name an entry that no longer exists, which every reader tolerates.
    local set = {}
    for i, name in ipairs(names) do
      local v = ARGV[base + 6 + i]
      if v ~= '' then set[#set + 1] = name; set[#set + 1] = string.sub(v, 2) end
    end
    local function put(k, v) set[#set + 1] = k; set[#set + 1] = v end
    if kind == 'succeeded' then
      put('state', 'succeeded'); put('result', result); put('fin', NOW_US)
      -- Only a retried job carries an earlier attempt's error.
      if f[4] ~= '0' then redis.call('HDEL', jk, 'ek', 'em') end
    elseif kind == 'retry' then
      put('state', 'retrying'); put('attempt', S(tonumber(f[4]) + 1)); put('run_at', at); put('ek', ek); put('em', em)
      redis.call('ZADD', KEYS[2], tonumber(at), id)
    elseif kind == 'dead' then
      put('state', 'failed'); put('ek', ek); put('em', em); put('fin', NOW_US); put('dead', NOW_US)
      put('dk', redis.call('XADD', P .. 'dead', '*', 'id', id))
    else
      put('state', 'cancelled'); put('ek', ek); put('em', em); put('fin', NOW_US)
    end
    redis.call('HSET', jk, unpack(set))
    if kind == 'succeeded' or kind == 'cancelled' then
      redis.call('EXPIRE', jk, ttl)
      if f[7] then redis.call('EXPIRE', f[7], ttl) end
    end
    out[#out + 1] = 1
  end
end
for sk, eids in pairs(acks) do
  bulk('XACK', sk, eids, {G})
  bulk('XDEL', sk, eids)
end
if #ended > 0 then bulk('ZREM', KEYS[1], ended) end
return out
"#;

/// KEYS: job hash, leases. ARGV: 3 token, 4 id, 5 ttl.
const RELEASE: &str = r#"
local jk, id = KEYS[1], ARGV[4]
local f = redis.call('HMGET', jk, 'state', 'tok', 'cancel', 'prio')
if f[1] ~= 'running' or f[2] ~= ARGV[3] then return 0 end
redis.call('ZREM', KEYS[2], id)
drop_entry(jk)
redis.call('HDEL', jk, 'tok', 'lu', 'host', 'st')
if f[3] == '1' then
  finish(jk, id, 'cancelled', 'cancelled', 'cancelled before it started', tonumber(ARGV[5]))
else
  local sk, eid = push(f[4], id)
  redis.call('HSET', jk, 'state', 'queued', 'sk', sk, 'eid', eid)
end
return 1
"#;

/// KEYS: job hash, leases, delayed. ARGV: 3 id, 4 ttl.
const CANCEL: &str = r#"
local jk, id, ttl = KEYS[1], ARGV[3], tonumber(ARGV[4])
local f = redis.call('HMGET', jk, 'state', 'lu')
local state = f[1]
if not state then return 'not-found' end
if state == 'queued' or state == 'scheduled' or state == 'retrying' then
  redis.call('ZREM', KEYS[3], id); drop_entry(jk)
  finish(jk, id, 'cancelled', 'cancelled', 'cancelled before it started', ttl)
  return 'cancelled'
elseif state == 'running' then
  if tonumber(f[2]) < NOW then
    redis.call('ZREM', KEYS[2], id); drop_entry(jk)
    finish(jk, id, 'cancelled', 'cancelled', 'cancelled while its host was gone', ttl)
    return 'cancelled'
  end
  redis.call('HSET', jk, 'cancel', '1')
  return 'stop-requested'
end
return 'already-finished'
"#;

/// KEYS: dead stream. ARGV: 3.. job ids (none: all dead letters of the
/// queue). Returns how many went back on the queue.
const DEAD_RETRY: &str = r#"
local ids = {}
if #ARGV < 3 then
  for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do ids[#ids + 1] = e[2][2] end
else
  for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local count = 0
for _, id in ipairs(ids) do
  local jk = jkey(id)
  local f = redis.call('HMGET', jk, 'state', 'dk', 'prio')
  if f[1] == 'failed' then
    if f[2] then redis.call('XDEL', KEYS[1], f[2]) end
    redis.call('HDEL', jk, 'result', 'ek', 'em', 'dead', 'dk', 'fin', 'tok', 'lu', 'host', 'st', 'pd', 'pt', 'cancel')
    local sk, eid = push(f[3], id)
    redis.call('HSET', jk, 'state', 'queued', 'attempt', '0', 'run_at', S(NOW), 'sk', sk, 'eid', eid)
    count = count + 1
  end
end
return count
"#;

/// KEYS: dead stream. Deletes every failed job of the queue; returns how many.
const DEAD_PURGE: &str = r#"
local count = 0
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  local jk = jkey(e[2][2])
  local f = redis.call('HMGET', jk, 'state', 'idem')
  if f[1] == 'failed' then
    if f[2] then redis.call('DEL', f[2]) end
    redis.call('DEL', jk)
    count = count + 1
  end
end
redis.call('DEL', KEYS[1])
return count
"#;

/// KEYS: prios, delayed, leases, dead. Returns {queued, delayed, running, dead}.
const STATS: &str = r#"
local queued = redis.call('ZCOUNT', KEYS[2], '-inf', NOW)
for _, p in ipairs(priorities()) do
  local sk = skey(p)
  local len = redis.call('XLEN', sk)
  local ok, pending = pcall(redis.call, 'XPENDING', sk, G)
  if ok and pending[1] then len = len - pending[1] end
  queued = queued + len
end
return {queued, redis.call('ZCOUNT', KEYS[2], '(' .. NOW, '+inf'), redis.call('ZCARD', KEYS[3]), redis.call('XLEN', KEYS[4])}
"#;

/// All scripts, compiled once (their SHA1 computed once).
pub struct Scripts {
    pub enqueue: ::redis::Script,
    pub fetch: ::redis::Script,
    pub renew: ::redis::Script,
    pub progress: ::redis::Script,
    pub complete: ::redis::Script,
    pub release: ::redis::Script,
    pub cancel: ::redis::Script,
    pub dead_retry: ::redis::Script,
    pub dead_purge: ::redis::Script,
    pub stats: ::redis::Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        let s = |body: &str| ::redis::Script::new(&format!("{PRELUDE}\n{body}"));
        Scripts {
            enqueue: s(ENQUEUE),
            fetch: s(FETCH),
            renew: s(RENEW),
            progress: s(PROGRESS),
            complete: s(COMPLETE),
            release: s(RELEASE),
            cancel: s(CANCEL),
            dead_retry: s(DEAD_RETRY),
            dead_purge: s(DEAD_PURGE),
            stats: s(STATS),
        }
    }
}
