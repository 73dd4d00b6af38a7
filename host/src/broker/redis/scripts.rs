//! The Lua scripts of the Redis broker. Every state change of a job runs in
//! one script, so it is atomic: no other client sees half of it, and two
//! hosts can never both take the same job.
//!
//! Each script touches the keys of one queue only (they share the hash tag
//! `{queue}`, see [`super::queue_prefix`]), so it runs on Redis Cluster too. Job
//! hashes are named inside the scripts from the queue prefix (`ARGV[1]`),
//! as BullMQ does: their names are only known once a stream entry is read.
//!
//! Times: `now` is the Redis server's clock (`TIME`), so that hosts with
//! skewed clocks agree on run times and expiries (the plain fetch path in
//! `fetch.rs` checks `expires_at` and stamps the start on the host's clock;
//! leases are idle times Redis measures itself). Deadlines and run times are in
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
-- Appends a job to the stream of its priority. The entry carries what a
-- fetch needs (id, envelope, task, expiry, enqueue time, attempt), so
-- leasing a new job never reads its hash. The consumer group is created by
-- the first fetch (at id 0, so it sees every entry added before), also
-- after a Redis restart without persistence. Priority 0 is always read;
-- others are listed in `prios`.
local function push(prio, id, env, task, exp, enq, attempt)
  local sk = skey(prio)
  if prio ~= '0' then redis.call('ZADD', P .. 'prios', tonumber(prio), prio) end
  local eid = redis.call('XADD', sk, '*', 'id', id, 'env', env, 'task', task, 'exp', exp or '', 'enq', enq, 'a', attempt)
  return sk, eid
end
-- Puts a job that waited (delay, release, dead letter) back on its stream.
local function requeue(jk, id, attempt)
  local f = redis.call('HMGET', jk, 'prio', 'env', 'task', 'exp', 'enq')
  local sk, eid = push(f[1], id, f[2], f[3], f[4], f[5], attempt)
  redis.call('HSET', jk, 'state', 'queued', 'attempt', attempt, 'sk', sk, 'eid', eid)
end
-- Leases live in the streams' pending lists: a running job's entry stays
-- pending, its holder's renewals reset the entry's idle time (XCLAIM to
-- itself), and an entry idle for longer than its holder's lease is taken
-- over with XAUTOCLAIM. `lease-ms` keeps each holder's lease length.
local function holder_lease(holder, default)
  return tonumber(redis.call('HGET', P .. 'lease-ms', holder)) or default
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
-- A job ended without a run's outcome (a take-over after its host died,
-- or a cancel): listed in `unrun` for whoever answers for it elsewhere
-- (the Celery consumer writes the task's result). Bounded; kept a day.
local function unrun(id)
  redis.call('LPUSH', P .. 'unrun', id)
  redis.call('LTRIM', P .. 'unrun', 0, 9999)
  redis.call('EXPIRE', P .. 'unrun', 86400)
end
-- Terminal states that are not the outcome of a run.
local function finish(jk, id, state, kind, message, ttl)
  redis.call('HSET', jk, 'state', state, 'fin', NOW_US)
  redis.call('HDEL', jk, 'tok')
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
  local sk, eid = push(ARGV[6], id, ARGV[4], ARGV[5], ARGV[8], NOW_US, '0')
  table.insert(f, 'state'); table.insert(f, 'queued')
  table.insert(f, 'sk'); table.insert(f, sk); table.insert(f, 'eid'); table.insert(f, eid)
end
redis.call('HSET', KEYS[1], unpack(f))
return {1, id}
"#;

/// The part of taking jobs that needs a script, run by a host at most every
/// few tens of ms per queue, when a delayed job comes due, and before it
/// waits for work (the new entries themselves are read with a plain
/// XREADGROUP and marked running with plain HSETs: reading stream entries
/// inside Lua costs several times what the read itself does).
///
/// KEYS: prios, delayed (of one queue).
/// ARGV: 3 consumer (host), 4 max, 5 lease ms, 6 token prefix, 7 token
/// suffix ('.' .. queue), 8 result ttl s, 9 wait info wanted ('0' no,
/// '1' yes, '2' yes, after sending entries back),
/// 10 number of excluded tasks, 11.. excluded tasks.
///
/// 1. due delayed jobs go onto their stream (or turn `expired`);
/// 2. at most once per a third of the lease (≤ 250 ms) per queue, entries
///    idle for longer than their holders' leases are taken with XAUTOCLAIM:
///    their jobs turn `expired`, `cancelled` (stop was requested),
///    `failed`/`lost` (no retry left), or run again here (a new attempt; an
///    entry read but never marked running keeps its attempt).
/// Returns {deliveries, priorities (highest first), wait}: deliveries =
/// flat {id, env, attempt, token, enq, stream, entry id}; wait = {ms until
/// the next delayed job or -1, then (only when asked) per stream its key
/// and the id the group last delivered}.
const MAINTAIN: &str = r#"
local C, max, lease, tokp, toks, ttl = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7], tonumber(ARGV[8])
local excluded = {}
for i = 11, 10 + tonumber(ARGV[10]) do excluded[ARGV[i]] = true end
local out, n = {}, 0
local function lease_job(jk, id, attempt, env, enq, sk, eid)
  n = n + 1
  local tok = tokp .. n .. toks
  redis.call('HSET', jk, 'state', 'running', 'tok', tok, 'host', C, 'st', NOW_US, 'attempt', attempt)
  -- A fresh job has nothing of an earlier attempt to clear.
  if attempt ~= '0' then redis.call('HDEL', jk, 'fin', 'pd', 'pt') end
  out[#out + 1] = id; out[#out + 1] = env; out[#out + 1] = attempt; out[#out + 1] = tok; out[#out + 1] = enq
  out[#out + 1] = sk; out[#out + 1] = eid
end

-- 1. promote due delayed jobs
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', NOW, 'LIMIT', 0, 1000)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[2], id)
  local jk = jkey(id)
  local f = redis.call('HMGET', jk, 'state', 'exp', 'attempt')
  if f[1] == 'scheduled' or f[1] == 'retrying' then
    local exp = tonumber(f[2])
    if exp and exp < NOW then
      finish(jk, id, 'expired', nil, nil, ttl)
    else
      requeue(jk, id, f[3] or '0')
    end
  end
end

-- 2. leases that ran out
local prios = priorities()
local LK = P .. 'lease-ms'
if redis.call('SET', P .. 'reclaim', '1', 'PX', math.max(10, math.min(250, math.floor(lease / 3))), 'NX') then
  -- Who holds entries; holders that hold none are forgotten.
  local holders, pending = {}, 0
  for _, p in ipairs(prios) do
    local ok, summary = pcall(redis.call, 'XPENDING', skey(p), G)
    if ok and type(summary[4]) == 'table' then
      pending = pending + summary[1]
      for _, c in ipairs(summary[4]) do holders[c[1]] = true end
    end
  end
  local min_idle = 0
  -- One threshold per queue: the longest lease of any holder (a shorter
  -- one is never cut short; a job of a short-lease host that died is taken
  -- over a little later). A holder with no recorded lease gets ours.
  local known, has = redis.call('HGETALL', LK), {}
  for i = 1, #known, 2 do
    if holders[known[i]] then
      has[known[i]] = true
      min_idle = math.max(min_idle, tonumber(known[i + 1]))
    else
      redis.call('HDEL', LK, known[i])
    end
  end
  for h in pairs(holders) do if not has[h] then min_idle = math.max(min_idle, lease) end end
  for _, p in ipairs(prios) do
    if pending == 0 or n >= max then break end
    local sk = skey(p)
    local cursor = redis.call('HGET', P .. 'cursor', p) or '0-0'
    local ok, res = pcall(redis.call, 'XAUTOCLAIM', sk, G, C, min_idle, cursor, 'COUNT', math.max(1, max - n))
    if ok then
      redis.call('HSET', P .. 'cursor', p, res[1])
      for _, e in ipairs(res[2]) do
        if type(e) == 'table' and type(e[2]) == 'table' and e[2][2] then
          local eid, id = e[1], e[2][2]
          local jk = jkey(id)
          local f = redis.call('HMGET', jk, 'state', 'cancel', 'attempt', 'maxr', 'exp', 'task', 'env', 'enq', 'eid')
          -- Read by a host that died before marking it running: it never
          -- ran, so it keeps its attempt.
          local unstarted = f[1] == 'queued' and f[9] == eid
          -- A hash missing what a run needs (partly written, or expired)
          -- has nothing to run.
          local whole = tonumber(f[3]) and tonumber(f[4]) and f[7] and f[8]
          if unstarted and whole then f[3] = S(tonumber(f[3]) - 1) end
          if not whole or (f[1] ~= 'running' and not unstarted) or f[9] ~= eid then
            -- Nothing runs on this entry any more.
            redis.call('XACK', sk, G, eid); redis.call('XDEL', sk, eid)
          else
            local exp = tonumber(f[5])
            if exp and exp < NOW then
              drop_entry(jk); finish(jk, id, 'expired', nil, nil, ttl)
            elseif f[2] == '1' then
              drop_entry(jk); finish(jk, id, 'cancelled', 'cancelled', 'cancelled while its host was gone', ttl); unrun(id)
            elseif not unstarted and tonumber(f[3]) + 1 > tonumber(f[4]) then
              drop_entry(jk); finish(jk, id, 'failed', 'lost', 'lease expired on every attempt (host died?)', ttl); unrun(id)
            elseif n < max and not excluded[f[6]] then
              lease_job(jk, id, S(tonumber(f[3]) + 1), f[7], f[8], sk, eid)
            else
              -- Not for this host: left as lost for the next fetch.
              redis.call('XCLAIM', sk, G, C, 0, eid, 'IDLE', min_idle, 'JUSTID')
            end
          end
        end
      end
    end
  end
end

if n > 0 then redis.call('HSET', LK, C, lease) end

-- What to block on: the ids last delivered to the group ('1'), so an entry
-- added since the host's read wakes it at once; or, when that read sent
-- entries back to the stream ('2'), the stream's last ids, so that those
-- entries do not wake it.
local wait = {}
local d = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
wait[1] = d[2] and S(tonumber(d[2]) - NOW) or '-1'
if ARGV[9] ~= '0' then
  local want = ARGV[9] == '1' and 'last-delivered-id' or 'last-generated-id'
  for _, p in ipairs(prios) do
    local ok, reply = pcall(redis.call, 'XINFO', ARGV[9] == '1' and 'GROUPS' or 'STREAM', skey(p))
    local last = '0-0'
    if ok then
      -- XINFO GROUPS: one flat list per group; XINFO STREAM: one flat list.
      local lists = ARGV[9] == '1' and reply or {reply}
      for _, g in ipairs(lists) do
        local name, id
        for i = 1, #g, 2 do
          if g[i] == 'name' then name = g[i + 1] elseif g[i] == want then id = g[i + 1] end
        end
        if id and (ARGV[9] ~= '1' or name == G) then last = id end
      end
    end
    wait[#wait + 1] = skey(p); wait[#wait + 1] = last
  end
end
return {out, prios, wait}
"#;

/// Entries a host read but does not run. KEYS: delayed. ARGV: 3 result
/// ttl s, then per entry: action ('expire': its job is past `expires_at`;
/// 'requeue': back to the end of its stream, for a task whose plugin is
/// saturated or an entry written before entries carried the envelope),
/// stream, entry id, job id. An entry whose job is no longer queued on it
/// is only acked and deleted.
const UNREAD: &str = r#"
local ttl = tonumber(ARGV[3])
for base = 4, #ARGV - 3, 4 do
  local action, sk, eid, id = ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local jk = jkey(id)
  local f = redis.call('HMGET', jk, 'state', 'eid', 'attempt', 'cancel')
  if f[1] ~= 'queued' or f[2] ~= eid then
    redis.call('XACK', sk, G, eid); redis.call('XDEL', sk, eid)
  elseif f[4] == '1' then
    -- Cancelled while this host held the entry: it never started.
    drop_entry(jk); finish(jk, id, 'cancelled', 'cancelled', 'cancelled before it started', ttl); unrun(id)
  elseif action == 'expire' then
    drop_entry(jk); finish(jk, id, 'expired', nil, nil, ttl)
  else
    drop_entry(jk); requeue(jk, id, f[3] or '0')
  end
end
return 1
"#;

/// KEYS: job hash. ARGV: 3 token, 4 lease ms.
/// Returns -1 (lost), 0 (held) or 1 (held, stop requested). Claiming the
/// entry again to its holder resets its idle time: the lease starts over.
const RENEW: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'state', 'tok', 'cancel', 'sk', 'eid', 'host')
if f[1] ~= 'running' or f[2] ~= ARGV[3] then return -1 end
if f[4] and f[5] and f[6] then
  -- No pending entry: nothing protects the job from being taken over.
  local ok, claimed = pcall(redis.call, 'XCLAIM', f[4], G, f[6], 0, f[5], 'JUSTID')
  if not ok or #claimed == 0 then return -1 end
  redis.call('HSET', P .. 'lease-ms', f[6], ARGV[4])
end
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
/// completions of one queue). KEYS: delayed. ARGV: 3 result ttl s,
/// then per job 13 values: token, id, outcome (succeeded|retry|dead|
/// cancelled), result JSON, error kind, error message, retry at ms, and
/// the optional record fields as '' (absent) or '=' .. value: plugin,
/// plugin version, touched, log, progress done, progress total.
/// Returns per job 1 (recorded) or 0 (the lease was not held).
const COMPLETE: &str = r#"
local ttl = tonumber(ARGV[3])
local names = {'plugin', 'pv', 'touched', 'log', 'pd', 'pt'}
local out = {}
-- Stream entries to ack and delete (per stream), each written with one
-- command for the whole batch.
local acks = {}
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
      redis.call('ZADD', KEYS[1], tonumber(at), id)
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
return out
"#;

/// KEYS: job hash. ARGV: 3 token, 4 id, 5 ttl.
const RELEASE: &str = r#"
local jk, id = KEYS[1], ARGV[4]
local f = redis.call('HMGET', jk, 'state', 'tok', 'cancel', 'attempt')
if f[1] ~= 'running' or f[2] ~= ARGV[3] then return 0 end
drop_entry(jk)
redis.call('HDEL', jk, 'tok', 'host', 'st')
if f[3] == '1' then
  finish(jk, id, 'cancelled', 'cancelled', 'cancelled before it started', tonumber(ARGV[5]))
  unrun(id)
else
  requeue(jk, id, f[4] or '0')
end
return 1
"#;

/// KEYS: job hash, delayed. ARGV: 3 id, 4 ttl, 5 the canceller's lease ms
/// (for a holder with none recorded).
const CANCEL: &str = r#"
local jk, id, ttl = KEYS[1], ARGV[3], tonumber(ARGV[4])
local f = redis.call('HMGET', jk, 'state', 'sk', 'eid')
local state = f[1]
if not state then return 'not-found' end
-- A queued job whose entry is pending was just read by a host that is
-- marking it running: that host is asked to stop it.
local read = false
if state == 'queued' and f[2] and f[3] then
  local ok, p = pcall(redis.call, 'XPENDING', f[2], G, f[3], f[3], 1)
  read = ok and p[1] ~= nil
end
if read then
  redis.call('HSET', jk, 'cancel', '1')
  return 'stop-requested'
elseif state == 'queued' or state == 'scheduled' or state == 'retrying' then
  redis.call('ZREM', KEYS[2], id); drop_entry(jk)
  finish(jk, id, 'cancelled', 'cancelled', 'cancelled before it started', ttl)
  unrun(id)
  return 'cancelled'
elseif state == 'running' then
  -- Its holder is gone when the entry sat idle past the holder's lease.
  local gone = true
  if f[2] and f[3] then
    local ok, p = pcall(redis.call, 'XPENDING', f[2], G, f[3], f[3], 1)
    if ok and p[1] then gone = tonumber(p[1][3]) >= holder_lease(p[1][2], tonumber(ARGV[5])) end
  end
  if gone then
    drop_entry(jk)
    finish(jk, id, 'cancelled', 'cancelled', 'cancelled while its host was gone', ttl)
    unrun(id)
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
    redis.call('HDEL', jk, 'result', 'ek', 'em', 'dead', 'dk', 'fin', 'tok', 'host', 'st', 'pd', 'pt', 'cancel')
    redis.call('HSET', jk, 'run_at', S(NOW))
    requeue(jk, id, '0')
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

/// KEYS: prios, delayed, dead. Returns {queued, delayed, running, dead}
/// (running: the streams' pending entries).
const STATS: &str = r#"
local queued, running = redis.call('ZCOUNT', KEYS[2], '-inf', NOW), 0
for _, p in ipairs(priorities()) do
  local sk = skey(p)
  local len = redis.call('XLEN', sk)
  local ok, pending = pcall(redis.call, 'XPENDING', sk, G)
  if ok and pending[1] then len = len - pending[1]; running = running + pending[1] end
  queued = queued + len
end
return {queued, redis.call('ZCOUNT', KEYS[2], '(' .. NOW, '+inf'), running, redis.call('XLEN', KEYS[3])}
"#;

/// All scripts, compiled once (their SHA1 computed once).
pub struct Scripts {
    pub enqueue: ::redis::Script,
    pub maintain: ::redis::Script,
    pub unread: ::redis::Script,
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
    /// Built once per broker: each script's SHA is computed here, not on every call.
    pub fn new() -> Scripts {
        let s = |body: &str| ::redis::Script::new(&format!("{PRELUDE}\n{body}"));
        Scripts {
            enqueue: s(ENQUEUE),
            maintain: s(MAINTAIN),
            unread: s(UNREAD),
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
