"""A producer written the way a Django app talks to Celery, run against celer.

The app declares its tasks as usual (their bodies never run here: celer runs
the plugin the manifest aliases them to) and calls `.delay()`, `send_task()`
and `AsyncResult.get()` unchanged. Driven by tests/tests/celery.rs, which
starts a `celer serve` with `[celery] enabled` and the `hello` plugin whose
manifest maps:

    proj.tasks.add   -> hello.add     {"sum": a + b}
    proj.tasks.greet -> hello.greet   {"message": "Hello, <name>!"}
    proj.tasks.tsum  -> hello.total   {"sum": total of numbers or {"sum": n} results}
    proj.tasks.fail  -> hello.fail    fails (permanently with retry=False)
    proj.tasks.slow  -> hostile.sleep busy for `ms` (progress at `steps`), then {"slept_ms": ms, …}
    proj.tasks.slow_retry -> hostile.sleep_then_retry  busy, then asks for a retry

Environment: CELERY_URL (broker and result backend), CELERY_QUEUE (the
queue, unique per test run), CELER_PREFIX (the host's key prefix),
CELER_WORKER (the host's Celery worker name, from [celery] worker_name). Exits non-zero with a message on the first
failed check; prints one JSON line of facts for the Rust side.
"""
import base64
import json
import os
import sys
import time
from datetime import datetime, timedelta, timezone

import redis
from celery import Celery
from celery.exceptions import TaskRevokedError

URL = os.environ["CELERY_URL"]
QUEUE = os.environ["CELERY_QUEUE"]
PREFIX = os.environ["CELER_PREFIX"]  # celer's key prefix: its own keys, to watch progress
ME = os.environ["CELER_WORKER"]  # the host's Celery worker name ([celery] worker_name)

app = Celery("proj", broker=URL, backend=URL)
app.conf.task_default_queue = QUEUE


@app.task(name="proj.tasks.add")
def add(a, b):  # runs in celer (hello.add), never here
    raise AssertionError("celer runs this task")


@app.task(name="proj.tasks.greet")
def greet(name, excited=False):
    raise AssertionError("celer runs this task")


@app.task(name="proj.tasks.tsum")
def tsum(parts):  # hello.total: a chord's callback
    raise AssertionError("celer runs this task")


@app.task(name="proj.tasks.fail")
def fail(message, retry=False):
    raise AssertionError("celer runs this task")


@app.task(name="proj.tasks.slow")
def slow(ms):  # hostile.sleep: busy for `ms`
    raise AssertionError("celer runs this task")


@app.task(name="proj.tasks.slow_retry")
def slow_retry(ms):  # hostile.sleep_then_retry: busy for `ms`, then asks for a retry
    raise AssertionError("celer runs this task")


def check(ok, what):
    if not ok:
        sys.exit(f"FAILED: {what}")


def expect_revoked(result, what):
    """`.get()` raises TaskRevokedError and the state reads REVOKED."""
    try:
        result.get(timeout=T)
        check(False, f"{what}: .get() raises TaskRevokedError")
    except TaskRevokedError:
        pass
    check(result.state == "REVOKED", f"{what}: state REVOKED, got {result.state}")


facts = {}
store = redis.Redis.from_url(URL)
T = 30

# 1. .delay() and send_task() -> .get() returns the plugin's JSON result.
check(add.delay(2, 3).get(timeout=T) == {"sum": 5}, "add.delay(2, 3).get() == {'sum': 5}")
r = app.send_task("proj.tasks.greet", kwargs={"name": "Ann"})
check(r.get(timeout=T) == {"message": "Hello, Ann!"}, "send_task(greet).get()")
check(r.state == "SUCCESS" and r.successful(), f"state SUCCESS, got {r.state}")
check(app.send_task("hello.noop").get(timeout=T) is None, "a plugin task name works too; noop returns None")

# 2. Byte level: what celer stored is what Celery's json.dumps would write.
raw = store.get(f"celery-task-meta-{r.id}")
meta = json.loads(raw)
check(list(meta) == ["status", "result", "traceback", "children", "date_done", "task_id"], f"meta keys {list(meta)}")
check(raw.decode() == json.dumps(meta), f"byte-identical to json.dumps: {raw!r}")
check(meta["status"] == "SUCCESS" and meta["traceback"] is None and meta["children"] == [] and meta["task_id"] == r.id, f"meta {meta}")
datetime.fromisoformat(meta["date_done"])
check(meta["date_done"].endswith("+00:00"), meta["date_done"])
check(0 < store.ttl(f"celery-task-meta-{r.id}") <= 86400, "SETEX with result_expires")

# 3. A failing task: .get() raises; propagate=False gives FAILURE and a traceback.
f = app.send_task("proj.tasks.fail", kwargs={"message": "organization 42 not found", "retry": False})
try:
    f.get(timeout=T)
    check(False, "a failing task's .get() raises")
except Exception as e:  # noqa: BLE001 - the class is recreated by Celery
    facts["failure_exception"] = type(e).__name__
    check("organization 42 not found" in str(e), f"exception message: {e!r}")
check(f.get(timeout=T, propagate=False) is not None, "propagate=False returns the exception")
check(f.state == "FAILURE" and f.failed(), f"state FAILURE, got {f.state}")
check("Traceback" in (f.traceback or ""), f"traceback: {f.traceback!r}")
fmeta = json.loads(store.get(f"celery-task-meta-{f.id}"))
check(set(fmeta["result"]) == {"exc_type", "exc_message", "exc_module"}, f"exception shape {fmeta['result']}")
check(fmeta["result"]["exc_message"] == ["organization 42 not found"], fmeta["result"])

# 4. countdown: not run before its time.
t0 = time.time()
c = add.apply_async((1, 1), countdown=2)
check(c.get(timeout=T) == {"sum": 2}, "countdown task result")
done = datetime.fromisoformat(json.loads(store.get(f"celery-task-meta-{c.id}"))["date_done"]).timestamp()
facts["countdown_done_after_s"] = round(done - t0, 3)
check(done - t0 >= 2.0, f"countdown=2 ran after {done - t0:.3f} s")

# 5. expires in the past: not run, reported as REVOKED (what a Celery worker stores).
x = add.apply_async((5, 5), expires=datetime.now(timezone.utc) - timedelta(seconds=5))
expect_revoked(x, "an expired task")
# ... and one that expires while it waits in celer's queue (its countdown is later).
y = add.apply_async((6, 6), countdown=3, expires=1.5)
expect_revoked(y, "a task that expired while waiting")

# 5b. revoke(): a task waiting for its countdown is not run and reads REVOKED
# at once; a task id revoked before its message is sent is never run.
v = add.apply_async((7, 7), countdown=4)
deadline = time.time() + T
# celer has taken the message once the job it made is findable.
while not store.exists(f"{PREFIX}celery:job:{v.id}") and time.time() < deadline:
    time.sleep(0.02)
t_revoke = time.time()
v.revoke()
expect_revoked(v, "a revoked task")
facts["revoked_result_after_s"] = round(time.time() - t_revoke, 3)
check(time.time() - t_revoke < 3.5, "REVOKED before the countdown would have run it")
early = "revoked-before-sent-" + QUEUE
app.control.revoke(early)
time.sleep(0.5)  # the broadcast reaches celer
w = add.apply_async((8, 8), task_id=early)
expect_revoked(w, "a task revoked before it was sent")

# A running task: revoke() lets it finish (as Celery does); revoke(terminate=True) stops it.
def wait_running(result):
    deadline = time.time() + T
    while time.time() < deadline:
        job = store.get(f"{PREFIX}celery:job:{result.id}")
        if job and store.hget(f"{PREFIX}{{{QUEUE}}}:j:{job.decode()}", "state") == b"running":
            return
        time.sleep(0.01)
    check(False, "the slow task started")


kept = slow.apply_async(kwargs={"ms": 800})
wait_running(kept)
kept.revoke()
check(kept.get(timeout=T)["slept_ms"] == 800, "revoke() without terminate: the running task finishes")
stopped = slow.apply_async(kwargs={"ms": 1900})
wait_running(stopped)
t_stop = time.time()
stopped.revoke(terminate=True)
expect_revoked(stopped, "a running task revoked with terminate=True")
facts["terminate_revoked_after_s"] = round(time.time() - t_stop, 3)
check(time.time() - t_stop < 1.6, "stopped before it would have finished")
# Revoked while running, then its attempt asks for a retry: no retry (as Celery).
again = slow_retry.apply_async(kwargs={"ms": 700})
wait_running(again)
again.revoke()
expect_revoked(again, "a revoked task whose running attempt asked for a retry")

# 5a. A producer's time_limit stops the run then (within the manifest's
# own limit, 2 s for this plugin), as TimeLimitExceeded.
t_limit = time.time()
limited = slow.apply_async(kwargs={"ms": 1900}, time_limit=1)
while app.backend.get_task_meta(limited.id)["status"] not in ("RETRY", "FAILURE") and time.time() - t_limit < T:
    time.sleep(0.02)
facts["time_limit_hit_after_s"] = round(time.time() - t_limit, 3)
check(time.time() - t_limit < 1.7, f"stopped at its 1 s time limit, not the plugin's 2 s: {time.time() - t_limit:.3f} s")
meta = app.backend.get_task_meta(limited.id)
check(meta["result"] is not None and "TimeLimitExceeded" in str(meta["result"]), f"TimeLimitExceeded: {meta}")
limited.revoke()  # no more attempts

# 5a'. Priorities (on Redis, kombu serves 0 first and 9 last): a priority-0
# task sent after a backlog of priority-9 ones of the same plugin (2 at a
# time) overtakes most of them, as with a Celery worker.
backlog = [slow.apply_async(kwargs={"ms": 300}, priority=9) for _ in range(8)]
deadline = time.time() + T
while not all(store.exists(f"{PREFIX}celery:job:{r.id}") for r in backlog) and time.time() < deadline:
    time.sleep(0.01)
urgent = slow.apply_async(kwargs={"ms": 300}, priority=0)
urgent.get(timeout=T)
[r.get(timeout=T) for r in backlog]
done_at = lambda r: datetime.fromisoformat(app.backend.get_task_meta(r.id)["date_done"])
after = sum(done_at(r) > done_at(urgent) for r in backlog)
facts["priority_9_done_after_the_urgent"] = after
check(after >= 2, f"the priority-0 task overtook the priority-9 backlog (in FIFO order it would end last): {after} of 8 ended after it")

# 5b'. While it runs: STARTED (celer runs with [celery] track_started =
# true, Celery's task_track_started) naming the host, then PROGRESS with
# what the plugin reported (the custom state Django progress bars read).
p = app.send_task("proj.tasks.slow", kwargs={"ms": 1500, "steps": 3})
states, started_info, progress_info = set(), None, None
deadline = time.time() + T
while not p.ready() and time.time() < deadline:
    # One read of the stored meta: `p.state` then `p.info` would be two,
    # and the state can move on (STARTED → PROGRESS) in between.
    meta = app.backend.get_task_meta(p.id)
    state, info = meta["status"], meta["result"]
    states.add(state)
    if state == "STARTED":
        started_info = info
    elif state == "PROGRESS":
        progress_info = info
    time.sleep(0.02)
check(p.get(timeout=T)["slept_ms"] == 1500, "the reporting task's result")
check(started_info is not None and started_info["hostname"] == ME and isinstance(started_info["pid"], int), f"STARTED with pid and hostname, saw {states} {started_info}")
check(progress_info is not None and progress_info["total"] == 3 and 1 <= progress_info["current"] <= 3, f"PROGRESS with current/total, saw {states} {progress_info}")
check(p.state == "SUCCESS", "a late progress report does not hide SUCCESS")
facts["running_states"] = sorted(states)

# 5c. Canvas: a chain runs its tasks in order, each given the previous
# result unless immutable; link= callbacks run after success.
from celery import chain
ch = chain(add.s(1, 2), add.si(5, 5)).apply_async()
check(ch.get(timeout=T) == {"sum": 10}, "the chain's last task ran")
check(ch.parent.get(timeout=T) == {"sum": 3}, "the chain's first task ran")
check(json.loads(store.get(f"celery-task-meta-{ch.id}"))["status"] == "SUCCESS", "chain result stored")
# A mutable signature gets the result first: greet({"sum": 3}) fails on its type.
bad = chain(add.s(1, 2), greet.s()).apply_async()
try:
    bad.get(timeout=T)
    check(False, "greet({'sum': 3}) fails")
except Exception as e:  # noqa: BLE001
    facts["chain_type_error"] = str(e)
    check("invalid type: map" in str(e), f"the previous result (a map) was passed on: {e!r}")
cb = greet.si(name="Lin")
cb.freeze()
linked = add.apply_async((2, 2), link=cb)
check(linked.get(timeout=T) == {"sum": 4}, "the linked task's own result")
check(app.AsyncResult(cb.id).get(timeout=T) == {"message": "Hello, Lin!"}, "the link= callback ran")
# link_error= errbacks run when the task fails for good, given its id (as
# Celery sends an errback that takes the task id); a success sends none.
eb = greet.s()
eb.freeze()
failing = app.send_task("proj.tasks.fail", kwargs={"message": "for the errback", "retry": False}, link_error=eb)
failing.get(timeout=T, propagate=False)
check(failing.state == "FAILURE", f"the failing task: FAILURE, got {failing.state}")
check(app.AsyncResult(eb.id).get(timeout=T) == {"message": f"Hello, {failing.id}!"}, "the link_error errback ran with the failed task's id")
unused = greet.si(name="never")
unused.freeze()
fine = add.apply_async((1, 1), link_error=unused)
check(fine.get(timeout=T) == {"sum": 2}, "a task with an errback succeeds")
time.sleep(0.5)
check(store.get(f"celery-task-meta-{unused.id}") is None, "no errback after a success")

# 5d. Groups and chords: a group's results come back in order; a chord's
# callback gets its header's results in header order (whichever finishes
# first) and runs once; a failed header task fails the callback with
# Celery's ChordError, and the callback's errbacks get its id.
from celery import chord, group
g = group(add.s(i, i) for i in range(5)).apply_async()
check(g.get(timeout=T) == [{"sum": 2 * i} for i in range(5)], "group results in order")
# The first header task finishes last; its result ({"slept_ms": …}) is no
# sum, so the callback fails naming it: part 0, the results are in header
# order, not in the order the parts finished.
c = chord([slow.si(ms=300), add.si(1, 2), add.si(3, 4)], tsum.s())()
c.get(timeout=T, propagate=False)
check(c.state == "FAILURE" and "part 0 is not a number" in str(c.result) and "slept_ms" in str(c.result), f"the callback got the late part first: {c.state} {c.result!r}")
ok = chord([add.s(i, 10 * i) for i in range(1, 4)], tsum.s())()
check(ok.get(timeout=T) == {"sum": 66}, "chord(add x3)(tsum) == 66")
meta = json.loads(store.get(f"celery-task-meta-{ok.id}"))
check(meta["status"] == "SUCCESS", f"the callback's meta: {meta}")
gid = ok.parent.id
check(store.get(f"celery-taskset-meta-{gid}.c") == b"done", "the chord is marked done after it fired")
check(not store.exists(f"celery-taskset-meta-{gid}.j", f"celery-taskset-meta-{gid}.s", f"celery-taskset-meta-{gid}.d"), "the chord's counting keys are cleared")
one = chord([add.s(20, 22)], tsum.s())()
check(one.get(timeout=T) == {"sum": 42}, "a chord with a header of one")
eb = greet.s()
eb.freeze()
broken = chord([add.s(1, 1), fail.s(message="part failed", retry=False), add.s(2, 2)], tsum.s().on_error(eb))()
try:
    broken.get(timeout=T)
    check(False, "a chord with a failed header task raises")
except Exception as e:  # noqa: BLE001 - Celery's client raises the header's error first (it checks parents)
    check(type(e).__name__ == "PluginError" and "part failed" in str(e), f"the failed part's own error: {e!r}")
callback = app.AsyncResult(broken.id)  # the callback alone, as another process sees it
e = callback.get(timeout=T, propagate=False)
facts["chord_error"] = f"{type(e).__name__}: {e}"
check(callback.state == "FAILURE" and type(e).__name__ == "ChordError" and "raised PluginError('part failed')" in str(e), f"the callback fails with ChordError naming the failed part: {callback.state} {e!r}")
check(app.AsyncResult(eb.id).get(timeout=T) == {"message": f"Hello, {broken.id}!"}, "the callback's errback ran with its id")

# A header task revoked before it runs counts as revoked: the chord fails.
waiting = chord([add.si(1, 1).set(countdown=30), add.si(2, 2)], tsum.s())()
first = waiting.parent.results[0]
deadline = time.time() + T
while not store.exists(f"{PREFIX}celery:job:{first.id}") and time.time() < deadline:
    time.sleep(0.02)
first.revoke()
e = app.AsyncResult(waiting.id).get(timeout=T, propagate=False)
check(type(e).__name__ == "ChordError" and "TaskRevokedError('revoked')" in str(e), f"a revoked header part fails the chord: {e!r}")

# A group or chord as the next step of a chain: the task before it starts it.
fan = chain(add.s(1, 1), group(add.si(5, 5), add.si(6, 6))).apply_async()
check(fan.get(timeout=T) == [{"sum": 10}, {"sum": 12}], f"chain(..., group(...)): {fan}")
chained_chord = chain(add.s(1, 1), chord([add.si(1, 2), add.si(3, 4)], tsum.s())).apply_async()
check(chained_chord.get(timeout=T) == {"sum": 10}, "chain(..., chord(...)) runs the chord after the first task")
# A group followed by more than one step: the client makes it a chord whose
# callback is a chain; the chain runs on the header's results, step by step.
mid = tsum.s()
mid.freeze()
fan_in = (group(add.s(1, 2), add.s(3, 4)) | mid | add.si(100, 1)).apply_async()
check(fan_in.get(timeout=T) == {"sum": 101}, f"group | tsum | add: the chain after the chord ran: {fan_in.state}")
check(app.AsyncResult(mid.id).get(timeout=T) == {"sum": 10}, "group | tsum | add: tsum got the header's results")
# A chord whose callback is a group: each of its tasks gets the header's results.
fan_out = chord([add.s(1, 2), add.s(3, 4)], group(tsum.s(), tsum.s()))()
check(fan_out.get(timeout=T) == [{"sum": 10}, {"sum": 10}], f"chord(header, group(tsum, tsum)): {fan_out!r}")
outer = chain(add.s(1, 1), group(add.si(1, 2), add.si(3, 4)) | tsum.s() | add.si(7, 7)).apply_async()
check(outer.get(timeout=T) == {"sum": 14}, "chain(a, group | tsum | add): the chord with a chain callback starts after a")
# A chord's header may hold chains and groups: the client flattens a nested
# group into the header, and a chain's last task carries the chord.
mixed = chord([chain(add.s(1, 2), add.si(10, 10)), group(add.si(1, 1), add.si(2, 2))], tsum.s())()
check(mixed.get(timeout=T) == {"sum": 26}, f"chord([chain, group], tsum): {mixed.state}")
# Chains inside a group or chord that a chain starts, and inside a group
# callback: each is sent as its first task, its last task counts.
fan_chains = chain(add.s(1, 1), group(chain(add.si(1, 2), add.si(3, 4)), add.si(5, 5))).apply_async()
check(fan_chains.get(timeout=T) == [{"sum": 7}, {"sum": 10}], f"chain(a, group(chain, b)): {fan_chains!r}")
chord_chains = chain(add.s(1, 1), chord([chain(add.si(1, 2), add.si(3, 4)), add.si(5, 5)], tsum.s())).apply_async()
check(chord_chains.get(timeout=T) == {"sum": 17}, f"chain(a, chord([chain, b], tsum)): {chord_chains.state}")
cb_chains = chord([add.s(1, 2)], group(chain(tsum.s(), add.si(1, 1)), tsum.s()))()
check(cb_chains.get(timeout=T) == [{"sum": 2}, {"sum": 3}], f"chord(h, group(chain, tsum)): {cb_chains!r}")

# 6. Malformed messages go to celer's dead letters; the host keeps consuming.
good = json.loads(json.dumps({
    "body": base64.b64encode(json.dumps([[1, 2], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()).decode(),
    "content-encoding": "utf-8", "content-type": "application/json",
    "headers": {"lang": "py", "task": "proj.tasks.add", "id": "x", "retries": 0, "root_id": "x", "parent_id": None},
    "properties": {"body_encoding": "base64", "delivery_tag": "t", "delivery_info": {"exchange": "", "routing_key": QUEUE}, "priority": 0},
}))
bad_b64 = dict(good, body="%%% not base64 %%%", headers=dict(good["headers"], id="bad-b64"))
pickle = dict(good, **{"content-type": "application/x-python-serialize"}, headers=dict(good["headers"], id="pickle"))
unknown = dict(good, headers=dict(good["headers"], id="unknown-task", task="proj.tasks.nobody_serves_this"))
for m in [b"{this is not json", json.dumps(bad_b64), json.dumps(pickle), json.dumps(unknown)]:
    store.lpush(QUEUE, m)
check(add.delay(20, 22).get(timeout=T) == {"sum": 42}, "consumption goes on after malformed messages")
u = app.AsyncResult("unknown-task")
check(u.get(timeout=T, propagate=False) is not None and u.state == "FAILURE", f"unknown task: FAILURE, got {u.state}")
check(json.loads(store.get("celery-task-meta-unknown-task"))["result"]["exc_type"] == "NotRegistered", "NotRegistered")

# 7. celer announces itself as a Celery worker on the events exchange:
# Celery's own event receiver (what `celery events` and Flower use) hears
# its heartbeats.
import socket
beats = []
class Heard(Exception):
    pass
def on_event(event):
    if event.get("type") == "worker-heartbeat" and event.get("hostname") == ME:
        beats.append(event)
        raise Heard()  # ends the capture
def capture_events(handler, timeout):
    """Feeds events to `handler` until it raises Heard or `timeout` passes."""
    with app.connection_for_read() as conn:
        recv = app.events.Receiver(conn, handlers={"*": handler})
        try:
            recv.capture(limit=None, timeout=timeout, wakeup=False)
        except (Heard, socket.timeout):
            pass
capture_events(on_event, 6)
check(bool(beats), "a celer host's worker-heartbeat reaches Celery's event receiver")
check(isinstance(beats[0]["active"], int) and isinstance(beats[0]["processed"], int) and beats[0]["freq"] == 2.0, f"heartbeat fields: {beats[0]}")
facts["heartbeat_from"] = beats[0]["hostname"]

# 8. Remote control, as `celery inspect` and Flower use it: the host
# answers as its worker name ([celery] worker_name; celer hosts of other tests on
# this Redis answer broadcasts too: only ours is looked at).
import threading
import uuid
def reply_of(replies):
    return next((r[ME] for r in replies or [] if ME in r), None)
check(reply_of(app.control.ping(timeout=2)) == {"ok": "pong"}, "ping answers pong")
check(app.control.ping(destination=["nobody@nowhere"], timeout=0.5) == [], "a request for another worker gets no answer")
insp = app.control.inspect(destination=[ME], timeout=3)
# The producer masks the arguments (kwargsrepr): Flower's safe view shows its text.
running = slow.apply_async(kwargs={"ms": 1500}, kwargsrepr="{'ms': '<hidden>'}")
wait_running(running)
active = (insp.active(safe=True) or {}).get(ME)
check(bool(active) and any(t["id"] == running.id and t["name"] == "proj.tasks.slow" and t["kwargs"] == "{'ms': '<hidden>'}" for t in active), f"inspect active lists the running task, as its producer shows it: {active}")
raw = (insp.active() or {}).get(ME)
check(bool(raw) and any(t["id"] == running.id and t["kwargs"] == {"ms": 1500} for t in raw), f"active without safe gives the arguments: {raw}")
stats = (insp.stats() or {}).get(ME)
check(bool(stats) and stats["total"].get("proj.tasks.add", 0) >= 1 and isinstance(stats["broker"], dict) and stats["prefetch_count"] == 0 and stats["rusage"]["maxrss"] > 0, f"stats: {stats}")
registered = (insp.registered() or {}).get(ME)
check(bool(registered) and "proj.tasks.add" in registered and "hello.add" in registered, f"registered: {registered}")
queues = (insp.active_queues() or {}).get(ME)
check(bool(queues) and queues[0]["name"] == QUEUE, f"active_queues: {queues}")
check((insp.reserved() or {}).get(ME) == [], "nothing reserved: celer does not prefetch")
# cancel_consumer / add_consumer (Flower's queue buttons, an operator
# pausing a queue on a host): the messages wait in the list meanwhile.
ctl = dict(destination=[ME], reply=True, timeout=3)
check(reply_of(app.control.cancel_consumer(QUEUE, **ctl)) == {"ok": f"no longer consuming from {QUEUE}"}, "cancel_consumer")
check((insp.active_queues() or {}).get(ME) == [], "no active queue after cancel_consumer")
time.sleep(1.2)  # a blocking read under way when it came ends
paused = add.delay(20, 22)
time.sleep(1.0)
check(paused.state == "PENDING" and store.llen(QUEUE) == 1, "a cancelled queue's message waits in its list")
check(reply_of(app.control.add_consumer(QUEUE, **ctl)) == {"ok": f"add consumer {QUEUE}"}, "add_consumer")
check(paused.get(timeout=T) == {"sum": 42}, "the waiting message runs after add_consumer")
check([q["name"] for q in (insp.active_queues() or {}).get(ME, [])] == [QUEUE], "the queue is active again")
unknown = reply_of(app.control.add_consumer("not-configured", **ctl)) or {}
check("[celery] queues" in unknown.get("error", ""), f"add_consumer of a queue not configured is refused: {unknown}")
# pool_shrink / pool_grow / autoscale (Flower's pool buttons): fewer of the
# host's slots in use without a restart, and back, never past its
# configured concurrency.
full = (insp.stats() or {}).get(ME, {}).get("pool", {}).get("max-concurrency")
check(isinstance(full, int) and full > 1, f"stats shows the pool size: {full}")
check(reply_of(app.control.pool_shrink(full, **ctl)) == {"ok": "pool will shrink (now 0)"}, "pool_shrink to 0")
held = add.delay(1, 1)
time.sleep(1.5)
check(held.state == "PENDING", f"no task starts while the pool is shrunk to 0: {held.state}")
check(reply_of(app.control.pool_grow(1, **ctl)) == {"ok": "pool will grow (now 1)"}, "pool_grow")
check(held.get(timeout=T) == {"sum": 2}, "the task runs once the pool grows")
check(reply_of(app.control.autoscale(1000, 0, **ctl)) == {"ok": f"autoscale now max={full} min=0"}, "autoscale, clamped to the configured concurrency")
check((insp.stats() or {}).get(ME, {}).get("pool", {}).get("max-concurrency") == full, "stats shows the pool back at full size")
check("error" in (reply_of(app.control.pool_grow(1, **ctl)) or {}), "pool_grow past the configured concurrency is refused")
check(running.get(timeout=T)["slept_ms"] == 1500, "the inspected task finished")
# rate_limit / time_limit (Flower's task page; an operator slowing a task
# whose mail provider or database struggles), on this host, no restart.
check(reply_of(app.control.rate_limit("proj.tasks.add", "2/s", **ctl)) == {"ok": "new rate limit set successfully"}, "rate_limit")
t_rate = time.time()
paced = [add.delay(i, 1) for i in range(5)]
check([r.get(timeout=T)["sum"] for r in paced] == [1, 2, 3, 4, 5], "rate-limited tasks all run")
facts["five_at_2_per_s_took_s"] = round(time.time() - t_rate, 3)
check(time.time() - t_rate >= 1.6, f"5 tasks at 2/s start 0.5 s apart (one start at once, then one per 0.5 s): {time.time() - t_rate:.3f} s")
check(reply_of(app.control.rate_limit("proj.tasks.add", 0, **ctl)) == {"ok": "rate limit disabled successfully"}, "rate_limit 0 lifts it")
t_free = time.time()
check([r.get(timeout=T)["sum"] for r in [add.delay(i, 2) for i in range(5)]] == [2, 3, 4, 5, 6], "tasks run once the rate is lifted")
facts["five_unlimited_took_s"] = round(time.time() - t_free, 3)
check(time.time() - t_free < 1.9, f"no pacing once lifted (2/s would take 2 s): {time.time() - t_free:.3f} s")
bad = reply_of(app.control.rate_limit("proj.tasks.add", "10/d", **ctl)) or {}
check(bad.get("error", "").startswith("Invalid rate limit string"), f"a rate with an unknown unit is refused: {bad}")
check(reply_of(app.control.rate_limit("proj.tasks.nope", "1/s", **ctl)) == {"error": "unknown task"}, "rate_limit of a task this host does not serve")
check(reply_of(app.control.time_limit("proj.tasks.slow", soft=0.5, hard=1, **ctl)) == {"ok": "time limits set successfully"}, "time_limit")
t_cut = time.time()
cut = slow.apply_async(kwargs={"ms": 1500})
while app.backend.get_task_meta(cut.id)["status"] not in ("RETRY", "FAILURE") and time.time() - t_cut < T:
    time.sleep(0.02)
facts["time_limit_control_hit_after_s"] = round(time.time() - t_cut, 3)
check(time.time() - t_cut < 1.9, f"stopped at the 0.5 s limit set by time_limit (unlimited, it would succeed at 1.5 s): {time.time() - t_cut:.3f} s")
check("TimeLimitExceeded" in str(app.backend.get_task_meta(cut.id)["result"]), "as TimeLimitExceeded")
cut.revoke()
check(reply_of(app.control.time_limit("proj.tasks.slow", **ctl)) == {"ok": "time limits set successfully"}, "time_limit without limits lifts it")
check(slow.apply_async(kwargs={"ms": 900}).get(timeout=T)["slept_ms"] == 900, "a 0.9 s task runs once the 0.5 s limit is lifted")
check(reply_of(app.control.pool_restart(reload=True, **ctl)) == {"ok": "reload started"}, "pool_restart rescans the plugins")
check(add.delay(2, 3).get(timeout=T) == {"sum": 5}, "tasks run after pool_restart")
facts["inspect_ping_from"] = ME

# 9. Task events (Celery's -E), turned on by `enable_events` as Flower does:
# Celery's event receiver sees the task received, started and succeeded.
check(reply_of(app.control.enable_events(reply=True, destination=[ME], timeout=3)) == {"ok": "task events enabled"}, "enable_events")
probe = str(uuid.uuid4())
seen = {}
def on_task(event):
    if event.get("uuid") == probe:
        seen[event["type"]] = event
        if event["type"] == "task-succeeded":
            raise Heard()
listener = threading.Thread(target=capture_events, args=(on_task, 10))
listener.start()
time.sleep(0.5)  # subscribed
add.apply_async((4, 4), task_id=probe).get(timeout=T)
listener.join(timeout=15)
check(set(seen) >= {"task-received", "task-started", "task-succeeded"}, f"task events seen: {sorted(seen)}")
received, succeeded = seen["task-received"], seen["task-succeeded"]
check(received["name"] == "proj.tasks.add" and received["args"] == "(4, 4)" and received["hostname"] == ME, f"task-received: {received}")
check(succeeded["result"] == "{'sum': 8}" and isinstance(succeeded["runtime"], float), f"task-succeeded: {succeeded}")
check(reply_of(app.control.disable_events(reply=True, destination=[ME], timeout=3)) == {"ok": "task events disabled"}, "disable_events")
facts["task_events"] = sorted(seen)

# 10. `celery control shutdown`, as deploys roll workers: the host answers,
# drains and exits 0 (the Rust side waits for its exit).
check(reply_of(app.control.shutdown(reply=True, destination=[ME], timeout=3)) == {"ok": "shutting down"}, "shutdown")

print(json.dumps(facts))
