#!/usr/bin/env python3
"""Deterministic demo data for celer's domain schema (examples/schema/).

Writes organizations with their members, contacts, images, tags, events and
attendees, plus the users' MFA devices, backup codes, audit log lines and an
old data export, shaped so that every seed task has something to do:

  * events that ended but are still CONFIRMED/ONGOING (events.complete_ended),
    COMPLETED more than 90 days ago (events.archive_completed), CONFIRMED and
    starting within 24 h with attendees, one of them already reminded
    (events.send_reminders);
  * images and tags without any relation (cleanup.orphan_images/orphan_tags);
  * unconfirmed TOTP devices older than 24 h and backup codes used more than
    90 days ago (cleanup.mfa); an export older than 7 days
    (cleanup.expired_exports);
  * in every organization an owner, an admin and members (export.organization
    is allowed for the first two only), and the owner of organization k+1 is
    also a member of organization k, so that "none of another organization's
    rows" is a real check.

Deterministic: the same --seed, --orgs, --rows-per-org and --now give the same
rows, byte for byte, on both backends. Only the standard library is used.

    # SQLite (the embedded default's database): schema + data
    python3 examples/gen_demo_data.py --sqlite celer-data/celer.db
    # PostgreSQL: SQL text (schema + COPY blocks) for psql
    python3 examples/gen_demo_data.py --postgres | psql "$DATABASE_URL" -v ON_ERROR_STOP=1
    # sizes: from a handful of rows to 1 M rows per organization
    python3 examples/gen_demo_data.py --sqlite x.db --orgs 1 --rows-per-org 1000000

--rows-per-org is the number of organization-scoped rows (memberships,
contacts, images, image relations, tags, tag relations, events, attendees)
per organization; users, MFA rows and audit lines come on top (about 5 % of
it). Layout of ids, for tests: organization k (1-based) has users
(k-1)*M+1 … k*M where M = members per organization; its first user is the
owner, its second the admin.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sqlite3
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))

# Tables in dependency order, with their columns as the generator writes them.
COLUMNS: dict[str, tuple[str, ...]] = {
    "users": ("id", "email", "name", "language", "is_active", "created_at", "updated_at", "last_login"),
    "organizations": ("id", "name", "created_by", "created_at", "updated_at"),
    "memberships": ("id", "user_id", "organization_id", "role", "created_at"),
    "contacts": ("id", "organization_id", "name", "email", "phone", "notes", "created_by", "created_at", "updated_at"),
    "images": ("id", "organization_id", "storage_key", "filename", "content_type", "size_bytes", "created_by", "created_at"),
    "image_relations": ("id", "image_id", "content_type", "object_id", "created_at"),
    "tags": ("id", "organization_id", "name", "created_by", "created_at"),
    "tag_relations": ("id", "tag_id", "content_type", "object_id", "created_at"),
    "events": ("id", "organization_id", "name", "description", "status", "start_date", "end_date", "created_by", "created_at", "updated_at"),
    "event_attendees": ("id", "event_id", "user_id", "reminder_sent_at", "created_at"),
    "auth_audit_log": ("id", "user_id", "event_type", "ip_address", "user_agent", "device_info", "success", "details", "skipped_reason", "job_id", "created_at"),
    "totp_devices": ("id", "user_id", "name", "confirmed", "created_at"),
    "backup_codes": ("id", "user_id", "code_hash", "used_at", "created_at"),
    "data_exports": ("id", "organization_id", "requested_by", "storage_key", "status", "size_bytes", "row_count", "created_at", "expires_at"),
}
TABLES = tuple(COLUMNS)

FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Margaret", "Dennis",
         "Radia", "John", "Hedy", "Tim", "Katherine", "Linus", "Sophie", "Niklaus", "Anita", "Guido")
LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Hamilton",
        "Ritchie", "Perlman", "McCarthy", "Lamarr", "Berners-Lee", "Johnson", "Torvalds", "Wilson",
        "Wirth", "Borg", "van Rossum")
LANGS = ("en", "en", "en", "de", "de", "fr")  # fr has no templates: the email plugin falls back to en
WORDS = ("alpha", "beta", "gamma", "delta", "summit", "meetup", "review", "launch", "retro", "workshop",
         "planning", "offsite", "demo", "sprint", "kickoff", "training")
AGENTS = ("Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0", "Mozilla/5.0 (Macintosh) Safari/605.1.15",
          "okhttp/4.12.0", "python-requests/2.32")
AUTH_EVENTS = ("login", "login_failed", "logout", "password_change", "mfa_enabled", "mfa_challenge")


def ts(t: dt.datetime) -> str:
    """The one timestamp text form: ISO-8601 UTC, microseconds, 'Z'."""
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_now(text: str | None) -> dt.datetime:
    if not text:
        return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(dt.timezone.utc)


@dataclass
class Sizes:
    """Rows per organization, derived from --rows-per-org."""
    members: int
    contacts: int
    images: int
    orphan_images: int
    tags: int
    orphan_tags: int
    tag_relations: int
    events: int
    attendees_per_event: int

    @staticmethod
    def for_rows(rows: int) -> "Sizes":
        members = max(3, rows * 5 // 100)
        images = max(2, rows * 10 // 100)
        orphan_images = max(1, images // 10)
        tags = max(2, rows * 2 // 100)
        orphan_tags = max(1, tags // 10)
        tag_relations = max(1, rows * 20 // 100)
        events = max(10, rows * 3 // 100)
        attendees_per_event = max(2, min(members, (rows * 10 // 100) // events))
        used = (members + images + (images - orphan_images) + tags + tag_relations
                + events + events * attendees_per_event)
        contacts = max(1, rows - used)
        return Sizes(members, contacts, images, orphan_images, tags, orphan_tags, tag_relations,
                     events, attendees_per_event)


@dataclass
class Ids:
    next: dict[str, int] = field(default_factory=lambda: {t: 1 for t in TABLES})

    def take(self, table: str) -> int:
        i = self.next[table]
        self.next[table] = i + 1
        return i


def generate(orgs: int, rows: int, seed: int, now: dt.datetime) -> Iterator[tuple[str, Iterable[tuple]]]:
    """Yields (table, rows) in an order that respects foreign keys."""
    size = Sizes.for_rows(rows)
    rng = random.Random(seed)
    ids = Ids()
    day = dt.timedelta(days=1)
    hour = dt.timedelta(hours=1)

    def past(lo_days: float, hi_days: float) -> dt.datetime:
        return now - dt.timedelta(seconds=rng.uniform(lo_days * 86400, hi_days * 86400))

    # Users: organization k owns ids (k-1)*M+1 … k*M.
    m = size.members
    users = []
    for uid in range(1, orgs * m + 1):
        first, last = FIRST[(uid - 1) % len(FIRST)], LAST[((uid - 1) // len(FIRST)) % len(LAST)]
        created = past(30, 900)
        email = f"{first.lower()}.{last.lower().replace(' ', '')}.{uid}@example.com"
        if (uid - 1) % m == 0:
            email = f"owner{(uid - 1) // m + 1}@example.com"
        login = ts(past(0, 30)) if uid % 3 else None
        users.append((uid, email, f"{first} {last}", LANGS[uid % len(LANGS)], 1, ts(created), ts(created), login))
    ids.next["users"] = orgs * m + 1
    yield "users", users

    orgs_rows = []
    for k in range(1, orgs + 1):
        created = past(400, 800)
        orgs_rows.append((ids.take("organizations"), f"Organization {k}", (k - 1) * m + 1, ts(created), ts(created)))
    yield "organizations", orgs_rows

    def org_users(k: int) -> range:
        return range((k - 1) * m + 1, k * m + 1)

    def memberships() -> Iterator[tuple]:
        for k in range(1, orgs + 1):
            for n, uid in enumerate(org_users(k)):
                role = "owner" if n == 0 else "admin" if n == 1 else "member"
                yield (ids.take("memberships"), uid, k, role, ts(past(1, 400)))
            if k < orgs:  # the next organization's owner is a plain member here
                yield (ids.take("memberships"), k * m + 1, k, "member", ts(past(1, 400)))
    yield "memberships", memberships()

    # Per organization: first ids of each table, to draw relation targets.
    contact_range: dict[int, range] = {}
    event_range: dict[int, range] = {}
    image_range: dict[int, range] = {}
    tag_range: dict[int, range] = {}

    def contacts() -> Iterator[tuple]:
        for k in range(1, orgs + 1):
            start = ids.next["contacts"]
            users_k = org_users(k)
            for _ in range(size.contacts):
                cid = ids.take("contacts")
                first, last = rng.choice(FIRST), rng.choice(LAST)
                created = past(1, 365)
                updated = created + dt.timedelta(seconds=rng.randint(0, 86400 * 30))
                yield (cid, k, f"{first} {last}", f"{first.lower()}.{cid}@contacts.example.net",
                       f"+49 30 {rng.randint(1000000, 9999999)}", "" if cid % 4 else f"Met at the {rng.choice(WORDS)}",
                       users_k[rng.randrange(len(users_k))], ts(created), ts(min(updated, now)))
            contact_range[k] = range(start, ids.next["contacts"])
    yield "contacts", contacts()

    EVENT_KINDS = 10

    def event_times(i: int) -> tuple[str, dt.datetime, dt.datetime]:
        kind = i % EVENT_KINDS
        if kind == 0:    # ended, still CONFIRMED -> complete_ended
            s = now - 3 * day; return "CONFIRMED", s, s + 5 * hour
        if kind == 1:    # ended half an hour ago, still ONGOING -> complete_ended
            s = now - 3 * hour; return "ONGOING", s, now - hour / 2
        if kind == 2:    # ongoing until tonight
            s = now - hour; return "ONGOING", s, now + 4 * hour
        if kind == 3:    # completed long ago -> archive_completed
            s = now - 120 * day; return "COMPLETED", s, s + 2 * hour
        if kind == 4:    # completed recently: stays
            s = now - 10 * day; return "COMPLETED", s, s + 2 * hour
        if kind == 5:    # starts within 24 h -> send_reminders
            s = now + hour * (2 + (i // EVENT_KINDS) % 20); return "CONFIRMED", s, s + 2 * hour
        if kind == 6:    # in three days: no reminder yet
            s = now + 3 * day; return "CONFIRMED", s, s + 2 * hour
        if kind == 7:
            s = now + 14 * day; return "DRAFT", s, s + day
        if kind == 8:
            s = now - 5 * day; return "CANCELLED", s, s + hour
        s = now - 400 * day; return "ARCHIVED", s, s + hour

    def events() -> Iterator[tuple]:
        for k in range(1, orgs + 1):
            start = ids.next["events"]
            users_k = org_users(k)
            for i in range(size.events):
                eid = ids.take("events")
                status, s, e = event_times(i)
                created = min(s, now) - 30 * day
                yield (eid, k, f"{rng.choice(WORDS).title()} {rng.choice(WORDS)} #{eid}",
                       "" if i % 3 else "Bring a laptop.", status, ts(s), ts(e),
                       users_k[i % len(users_k)], ts(created), ts(created))
            event_range[k] = range(start, ids.next["events"])
    yield "events", events()

    def attendees() -> Iterator[tuple]:
        for k in range(1, orgs + 1):
            users_k = org_users(k)
            for i, eid in enumerate(event_range[k]):
                offset = rng.randrange(len(users_k))
                for j in range(size.attendees_per_event):
                    uid = users_k[(offset + j) % len(users_k)]
                    # Of the events starting soon, the first attendee was already reminded.
                    reminded = ts(now - hour) if (i % EVENT_KINDS == 5 and j == 0) else None
                    yield (ids.take("event_attendees"), eid, uid, reminded, ts(now - 20 * day))
    yield "event_attendees", attendees()

    def images() -> Iterator[tuple]:
        for k in range(1, orgs + 1):
            start = ids.next["images"]
            users_k = org_users(k)
            for _ in range(size.images):
                iid = ids.take("images")
                name = f"{rng.choice(WORDS)}-{iid}.jpg"
                yield (iid, k, f"images/{k}/{iid}-{name}", name, "image/jpeg", rng.randint(10_000, 5_000_000),
                       users_k[rng.randrange(len(users_k))], ts(past(1, 365)))
            image_range[k] = range(start, ids.next["images"])
    yield "images", images()

    def image_relations() -> Iterator[tuple]:
        for k in range(1, orgs + 1):
            # The last `orphan_images` images of each organization have no relation.
            related = image_range[k][: size.images - size.orphan_images]
            for iid in related:
                if iid % 2:
                    target = ("contact", contact_range[k][rng.randrange(len(contact_range[k]))])
                else:
                    target = ("event", event_range[k][rng.randrange(len(event_range[k]))])
                yield (ids.take("image_relations"), iid, target[0], target[1], ts(past(0, 300)))
    yield "image_relations", image_relations()

    def tags() -> Iterator[tuple]:
        for k in range(1, orgs + 1):
            start = ids.next["tags"]
            users_k = org_users(k)
            for n in range(size.tags):
                tid = ids.take("tags")
                yield (tid, k, f"{WORDS[n % len(WORDS)]}-{n}", users_k[n % len(users_k)], ts(past(1, 365)))
            tag_range[k] = range(start, ids.next["tags"])
    yield "tags", tags()

    def tag_relations() -> Iterator[tuple]:
        for k in range(1, orgs + 1):
            related = tag_range[k][: size.tags - size.orphan_tags]
            for n in range(size.tag_relations):
                tid = related[n % len(related)]
                pick = n % 3
                if pick == 0:
                    target = ("contact", contact_range[k][rng.randrange(len(contact_range[k]))])
                elif pick == 1:
                    target = ("event", event_range[k][rng.randrange(len(event_range[k]))])
                else:
                    target = ("image", image_range[k][rng.randrange(len(image_range[k]))])
                yield (ids.take("tag_relations"), tid, target[0], target[1], ts(past(0, 300)))
    yield "tag_relations", tag_relations()

    def audit() -> Iterator[tuple]:
        for uid in range(1, orgs * m + 1):
            kind = AUTH_EVENTS[uid % len(AUTH_EVENTS)]
            ok = 0 if kind == "login_failed" else 1
            yield (ids.take("auth_audit_log"), uid, kind, f"192.0.2.{uid % 250 + 1}", AGENTS[uid % len(AGENTS)],
                   json.dumps({"os": "Linux", "browser": "Firefox"}, sort_keys=True), ok,
                   json.dumps({"method": "password"}, sort_keys=True), None, None, ts(past(0, 60)))
    yield "auth_audit_log", audit()

    def totp() -> Iterator[tuple]:
        for uid in range(1, orgs * m + 1):
            r = uid % 10
            if r < 8:
                yield (ids.take("totp_devices"), uid, "phone", 1, ts(past(30, 300)))
            elif r == 8:  # abandoned set-up: older than 24 h -> cleanup.mfa
                yield (ids.take("totp_devices"), uid, "phone", 0, ts(now - 3 * day))
            else:         # set-up in progress: stays
                yield (ids.take("totp_devices"), uid, "phone", 0, ts(now - 2 * hour))
    yield "totp_devices", totp()

    def codes() -> Iterator[tuple]:
        for uid in range(1, orgs * m + 1):
            if uid % 10 >= 8:
                continue
            created = ts(now - 200 * day)
            yield (ids.take("backup_codes"), uid, f"sha256${uid:08x}a", ts(now - 100 * day), created)  # -> cleanup.mfa
            yield (ids.take("backup_codes"), uid, f"sha256${uid:08x}b", ts(now - 5 * day), created)
            yield (ids.take("backup_codes"), uid, f"sha256${uid:08x}c", None, created)
    yield "backup_codes", codes()

    def exports() -> Iterator[tuple]:
        for k in range(1, orgs + 1):
            created = now - 10 * day  # older than 7 days -> cleanup.expired_exports
            yield (ids.take("data_exports"), k, (k - 1) * m + 1, f"exports/{k}/demo-old.zip", "COMPLETED",
                   0, 0, ts(created), ts(created + 7 * day))
    yield "data_exports", exports()


# ----------------------------------------------------------------- sinks

def write_sqlite(path: str, batches: Iterator[tuple[str, Iterable[tuple]]], schema: bool, reset: bool) -> dict[str, int]:
    con = sqlite3.connect(path, timeout=30)
    con.execute("PRAGMA synchronous = OFF")
    if schema:
        with open(os.path.join(HERE, "schema", "sqlite.sql"), encoding="utf-8") as f:
            con.executescript(f.read())
    counts: dict[str, int] = {}
    with con:
        if reset:
            for table in reversed(TABLES):
                con.execute(f"DELETE FROM {table}")
        for table, rows in batches:
            cols = COLUMNS[table]
            sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            n = 0
            chunk: list[tuple] = []
            for row in rows:
                chunk.append(row)
                if len(chunk) == 10_000:
                    con.executemany(sql, chunk)
                    n += len(chunk)
                    chunk.clear()
            con.executemany(sql, chunk)
            counts[table] = n + len(chunk)
    con.close()
    return counts


BOOLS = {("users", "is_active"), ("auth_audit_log", "success"), ("totp_devices", "confirmed")}


def copy_field(value, is_bool: bool) -> str:
    if value is None:
        return r"\N"
    if is_bool:
        return "t" if value else "f"
    text = str(value)
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def write_postgres(out, batches: Iterator[tuple[str, Iterable[tuple]]], schema: bool, reset: bool) -> dict[str, int]:
    out.write("-- generated by examples/gen_demo_data.py\n\\set ON_ERROR_STOP on\nSET client_min_messages = warning;\nBEGIN;\n")
    if schema:
        with open(os.path.join(HERE, "schema", "postgres.sql"), encoding="utf-8") as f:
            out.write(f.read())
    if reset:
        out.write(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE;\n")
    counts: dict[str, int] = {}
    for table, rows in batches:
        cols = COLUMNS[table]
        bools = [(table, c) in BOOLS for c in cols]
        out.write(f"COPY {table} ({', '.join(cols)}) FROM stdin;\n")
        n = 0
        for row in rows:
            out.write("\t".join(copy_field(v, b) for v, b in zip(row, bools)))
            out.write("\n")
            n += 1
        out.write("\\.\n")
        counts[table] = n
    # Explicit ids were inserted: move each identity sequence past them.
    for table in TABLES:
        out.write(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                  f"GREATEST((SELECT max(id) FROM {table}), 1));\n")
    out.write("COMMIT;\n")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--sqlite", metavar="PATH", help="write into this SQLite database file")
    where.add_argument("--postgres", action="store_true", help="print SQL (schema + COPY) for psql on stdout")
    p.add_argument("--orgs", type=int, default=3, help="organizations (default 3)")
    p.add_argument("--rows-per-org", type=int, default=200,
                   help="organization-scoped rows per organization, from ~10 to 1000000 (default 200)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    p.add_argument("--now", help="reference time, ISO-8601 (default: now, UTC, to the second); "
                                 "fix it for byte-identical output")
    p.add_argument("--no-schema", action="store_true", help="do not apply examples/schema/*.sql first")
    p.add_argument("--reset", action="store_true", help="delete existing rows of the domain tables first")
    args = p.parse_args(argv)
    if args.orgs < 1 or args.rows_per_org < 1:
        p.error("--orgs and --rows-per-org must be positive")
    now = parse_now(args.now)
    batches = generate(args.orgs, args.rows_per_org, args.seed, now)
    if args.sqlite:
        os.makedirs(os.path.dirname(os.path.abspath(args.sqlite)), exist_ok=True)
        counts = write_sqlite(args.sqlite, batches, not args.no_schema, args.reset)
    else:
        counts = write_postgres(sys.stdout, batches, not args.no_schema, args.reset)
    summary = ", ".join(f"{t} {n}" for t, n in counts.items())
    print(f"gen_demo_data: {args.orgs} organizations, now={ts(now)}: {summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
