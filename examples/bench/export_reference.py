#!/usr/bin/env python3
"""The export benchmark's Python reference: what a Celery task would do.

The same work as the `export` plugin (plugins/export): check that the
requester is an owner or admin, read every table of the organization in
keyset pages with the same SQL, write each row as a JSON object into one
JSON array per table, inside a deflate (level 1) zip written as a stream —
with psycopg (PostgreSQL) or sqlite3, json and zipfile, as a Django/Celery
task would, minus the ORM. Prints one JSON line: rows, seconds, rows/s,
peak RSS.

    python3 examples/bench/export_reference.py --sqlite celer-data/celer.db --org 1 --user 1 --out /tmp/x.zip
    python3 examples/bench/export_reference.py --postgres "$DATABASE_URL" --org 1 --user 1 --out /tmp/x.zip
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import sys
import time
import zipfile

PAGE = 5000
INT_MIN = -(2**63)

# (file, columns, page SQL with $1 org, then the key values, then the limit, key width)
TABLES = [
    ("members", ["id", "user_id", "email", "name", "language", "role", "joined_at"],
     "SELECT m.id, m.user_id, u.email, u.name, u.language, m.role, m.created_at "
     "FROM memberships m JOIN users u ON u.id = m.user_id "
     "WHERE m.organization_id = $1 AND m.id > $2 ORDER BY m.id LIMIT $3", 1),
    ("contacts", ["id", "name", "email", "phone", "notes", "created_by", "created_at", "updated_at"],
     "SELECT id, name, email, phone, notes, created_by, created_at, updated_at FROM contacts "
     "WHERE organization_id = $1 AND id > $2 ORDER BY id LIMIT $3", 1),
    ("images", ["id", "storage_key", "filename", "content_type", "size_bytes", "created_by", "created_at"],
     "SELECT id, storage_key, filename, content_type, size_bytes, created_by, created_at FROM images "
     "WHERE organization_id = $1 AND id > $2 ORDER BY id LIMIT $3", 1),
    ("image_relations", ["image_id", "id", "content_type", "object_id", "created_at"],
     "SELECT r.image_id, r.id, r.content_type, r.object_id, r.created_at "
     "FROM image_relations r JOIN images i ON i.id = r.image_id "
     "WHERE i.organization_id = $1 AND i.id >= $2 AND (r.image_id, r.id) > ($2, $3) "
     "ORDER BY r.image_id, r.id LIMIT $4", 2),
    ("tags", ["id", "name", "created_by", "created_at"],
     "SELECT id, name, created_by, created_at FROM tags "
     "WHERE organization_id = $1 AND id > $2 ORDER BY id LIMIT $3", 1),
    ("tag_relations", ["tag_id", "id", "content_type", "object_id", "created_at"],
     "SELECT r.tag_id, r.id, r.content_type, r.object_id, r.created_at "
     "FROM tag_relations r JOIN tags t ON t.id = r.tag_id "
     "WHERE t.organization_id = $1 AND t.id >= $2 AND (r.tag_id, r.id) > ($2, $3) "
     "ORDER BY r.tag_id, r.id LIMIT $4", 2),
    ("events", ["id", "name", "description", "status", "start_date", "end_date", "created_by", "created_at", "updated_at"],
     "SELECT id, name, description, status, start_date, end_date, created_by, created_at, updated_at "
     "FROM events WHERE organization_id = $1 AND id > $2 ORDER BY id LIMIT $3", 1),
    ("event_attendees", ["event_id", "id", "user_id", "reminder_sent_at", "created_at"],
     "SELECT a.event_id, a.id, a.user_id, a.reminder_sent_at, a.created_at "
     "FROM event_attendees a JOIN events e ON e.id = a.event_id "
     "WHERE e.organization_id = $1 AND e.id >= $2 AND (a.event_id, a.id) > ($2, $3) "
     "ORDER BY a.event_id, a.id LIMIT $4", 2),
]


def default(value):
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return str(value)


class Db:
    def __init__(self, args):
        if args.sqlite:
            import sqlite3
            self.con = sqlite3.connect(args.sqlite)
            self.style = "sqlite"
        else:
            import psycopg  # pip install "psycopg[binary]"
            self.con = psycopg.connect(args.postgres)
            self.style = "postgres"

    def sql(self, text: str, n: int) -> str:
        # $1 … $n → ?1 … ?n: sqlite3 takes numbered placeholders.
        if self.style == "sqlite":
            for i in range(n, 0, -1):
                text = text.replace(f"${i}", f"?{i}")
            return text
        return text

    def rows(self, text: str, params: list):
        if self.style == "sqlite":
            return self.con.execute(self.sql(text, len(params)), params).fetchall()
        # psycopg: rewrite $n to %s with the parameters in order of use.
        import re
        order = [int(m) for m in re.findall(r"\$(\d+)", text)]
        with self.con.cursor() as cur:
            cur.execute(re.sub(r"\$\d+", "%s", text), [params[i - 1] for i in order])
            return cur.fetchall()


def main() -> int:
    p = argparse.ArgumentParser()
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--sqlite")
    g.add_argument("--postgres")
    p.add_argument("--org", type=int, required=True)
    p.add_argument("--user", type=int, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    started = time.monotonic()
    db = Db(args)
    role = db.rows("SELECT role FROM memberships WHERE organization_id = $1 AND user_id = $2", [args.org, args.user])
    if not role or role[0][0] not in ("owner", "admin"):
        print(f"user {args.user} may not export organization {args.org}", file=sys.stderr)
        return 1
    total = 0
    with zipfile.ZipFile(args.out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, columns, sql, width in TABLES:
            after = [INT_MIN] * width
            with zf.open(f"{name}.json", "w", force_zip64=True) as f:
                f.write(b"[")
                first = True
                while True:
                    page = db.rows(sql, [args.org, *after, PAGE])
                    for row in page:
                        f.write(b"\n" if first else b",\n")
                        first = False
                        f.write(json.dumps(dict(zip(columns, row)), default=default, separators=(",", ":")).encode())
                    total += len(page)
                    if len(page) < PAGE:
                        break
                    after = list(page[-1][:width])
                f.write(b"]\n" if first else b"\n]\n")
    seconds = time.monotonic() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": total, "seconds": round(seconds, 3), "rows_per_s": round(total / seconds),
                      "peak_rss_mib": round(peak_kib / 1024, 1), "backend": db.style}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
