-- celer demo/domain schema for SQLite: the Django models of the seed jobs
-- (users, organizations, memberships, contacts, images, tags, events,
-- auth audit log, MFA devices, data exports), as the first-party plugins
-- (plugins/email, export, cleanup, events, audit, permissions) read and
-- write them. Twin of postgres.sql: same tables, columns and indexes.
--
-- Apply to the embedded default database before (or after) `celer serve`:
--     sqlite3 celer-data/celer.db < examples/schema/sqlite.sql
-- or let the generator do it: python3 examples/gen_demo_data.py --sqlite celer-data/celer.db
-- Idempotent (IF NOT EXISTS everywhere).
--
-- Conventions, shared with the host's SQLite binding of WIT values:
--   * timestamps are declared DATETIME (as Django declares them) and hold
--     ISO-8601 UTC text, always the same width, 'YYYY-MM-DDTHH:MM:SS.ffffffZ'
--     (e.g. '2026-11-22T12:00:00.000000Z'): the host binds a WIT `timestamp`
--     parameter in exactly this form, so `created_at < $1` compares
--     correctly as text, and reads a DATETIME column back as a timestamp.
--     Store nothing else there (Django's own 'YYYY-MM-DD HH:MM:SS' form
--     would compare wrongly against it).
--   * booleans are declared BOOLEAN and hold 0/1 (read back as booleans);
--     JSON is TEXT.
--   * polymorphic relations (image_relations, tag_relations) name the
--     target by content_type ('organization', 'contact', 'event', 'user')
--     and object_id, as Django's contenttypes framework does.

CREATE TABLE IF NOT EXISTS users (
    id           INTEGER PRIMARY KEY,
    email        TEXT    NOT NULL UNIQUE,
    name         TEXT    NOT NULL DEFAULT '',
    language     TEXT    NOT NULL DEFAULT 'en',
    is_active    BOOLEAN NOT NULL DEFAULT 1,
    created_at   DATETIME NOT NULL,
    updated_at   DATETIME NOT NULL,
    last_login   DATETIME
);

CREATE TABLE IF NOT EXISTS organizations (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL,
    created_by   INTEGER REFERENCES users(id) ON DELETE SET NULL,
    created_at   DATETIME NOT NULL,
    updated_at   DATETIME NOT NULL
);

CREATE TABLE IF NOT EXISTS memberships (
    id              INTEGER PRIMARY KEY,
    user_id         INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    organization_id INTEGER NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    role            TEXT    NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at      DATETIME NOT NULL,
    UNIQUE (user_id, organization_id)
);
CREATE INDEX IF NOT EXISTS memberships_org_id ON memberships (organization_id, id);

CREATE TABLE IF NOT EXISTS contacts (
    id              INTEGER PRIMARY KEY,
    organization_id INTEGER NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    name            TEXT    NOT NULL,
    email           TEXT    NOT NULL DEFAULT '',
    phone           TEXT    NOT NULL DEFAULT '',
    notes           TEXT    NOT NULL DEFAULT '',
    created_by      INTEGER REFERENCES users(id) ON DELETE SET NULL,
    created_at      DATETIME NOT NULL,
    updated_at      DATETIME NOT NULL
);
CREATE INDEX IF NOT EXISTS contacts_org_id ON contacts (organization_id, id);

CREATE TABLE IF NOT EXISTS images (
    id              INTEGER PRIMARY KEY,
    organization_id INTEGER NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    storage_key     TEXT    NOT NULL,
    filename        TEXT    NOT NULL,
    content_type    TEXT    NOT NULL DEFAULT 'application/octet-stream',
    size_bytes      INTEGER NOT NULL DEFAULT 0,
    created_by      INTEGER REFERENCES users(id) ON DELETE SET NULL,
    created_at      DATETIME NOT NULL
);
CREATE INDEX IF NOT EXISTS images_org_id ON images (organization_id, id);

CREATE TABLE IF NOT EXISTS image_relations (
    id           INTEGER PRIMARY KEY,
    image_id     INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    content_type TEXT    NOT NULL,
    object_id    INTEGER NOT NULL,
    created_at   DATETIME NOT NULL
);
CREATE INDEX IF NOT EXISTS image_relations_image_id ON image_relations (image_id, id);
CREATE INDEX IF NOT EXISTS image_relations_object ON image_relations (content_type, object_id);

CREATE TABLE IF NOT EXISTS tags (
    id              INTEGER PRIMARY KEY,
    organization_id INTEGER NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    name            TEXT    NOT NULL,
    created_by      INTEGER REFERENCES users(id) ON DELETE SET NULL,
    created_at      DATETIME NOT NULL,
    UNIQUE (organization_id, name)
);
CREATE INDEX IF NOT EXISTS tags_org_id ON tags (organization_id, id);

CREATE TABLE IF NOT EXISTS tag_relations (
    id           INTEGER PRIMARY KEY,
    tag_id       INTEGER NOT NULL REFERENCES tags(id) ON DELETE CASCADE,
    content_type TEXT    NOT NULL,
    object_id    INTEGER NOT NULL,
    created_at   DATETIME NOT NULL
);
CREATE INDEX IF NOT EXISTS tag_relations_tag_id ON tag_relations (tag_id, id);
CREATE INDEX IF NOT EXISTS tag_relations_object ON tag_relations (content_type, object_id);

CREATE TABLE IF NOT EXISTS events (
    id              INTEGER PRIMARY KEY,
    organization_id INTEGER NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    name            TEXT    NOT NULL,
    description     TEXT    NOT NULL DEFAULT '',
    status          TEXT    NOT NULL DEFAULT 'DRAFT'
                    CHECK (status IN ('DRAFT', 'CONFIRMED', 'ONGOING', 'COMPLETED', 'CANCELLED', 'ARCHIVED')),
    start_date      DATETIME NOT NULL,
    end_date        DATETIME NOT NULL,
    created_by      INTEGER REFERENCES users(id) ON DELETE SET NULL,
    created_at      DATETIME NOT NULL,
    updated_at      DATETIME NOT NULL
);
CREATE INDEX IF NOT EXISTS events_org_id ON events (organization_id, id);
CREATE INDEX IF NOT EXISTS events_status_end ON events (status, end_date);
CREATE INDEX IF NOT EXISTS events_status_start ON events (status, start_date);

CREATE TABLE IF NOT EXISTS event_attendees (
    id               INTEGER PRIMARY KEY,
    event_id         INTEGER NOT NULL REFERENCES events(id) ON DELETE CASCADE,
    user_id          INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    reminder_sent_at DATETIME,
    created_at       DATETIME NOT NULL,
    UNIQUE (event_id, user_id)
);
CREATE INDEX IF NOT EXISTS event_attendees_event_id ON event_attendees (event_id, id);

CREATE TABLE IF NOT EXISTS auth_audit_log (
    id             INTEGER PRIMARY KEY,
    user_id        INTEGER REFERENCES users(id) ON DELETE SET NULL,
    event_type     TEXT    NOT NULL,
    ip_address     TEXT,
    user_agent     TEXT    NOT NULL DEFAULT '',
    device_info    TEXT    NOT NULL DEFAULT '{}',
    success        BOOLEAN NOT NULL,
    details        TEXT    NOT NULL DEFAULT '{}',
    skipped_reason TEXT,
    job_id         TEXT    UNIQUE,
    created_at     DATETIME NOT NULL
);
CREATE INDEX IF NOT EXISTS auth_audit_log_user ON auth_audit_log (user_id, created_at);

CREATE TABLE IF NOT EXISTS totp_devices (
    id         INTEGER PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name       TEXT    NOT NULL DEFAULT 'default',
    confirmed  BOOLEAN NOT NULL DEFAULT 0,
    created_at DATETIME NOT NULL
);
CREATE INDEX IF NOT EXISTS totp_devices_unconfirmed ON totp_devices (confirmed, created_at);

CREATE TABLE IF NOT EXISTS backup_codes (
    id         INTEGER PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    code_hash  TEXT    NOT NULL,
    used_at    DATETIME,
    created_at DATETIME NOT NULL
);
CREATE INDEX IF NOT EXISTS backup_codes_used ON backup_codes (used_at);

CREATE TABLE IF NOT EXISTS data_exports (
    id              INTEGER PRIMARY KEY,
    organization_id INTEGER NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    requested_by    INTEGER REFERENCES users(id) ON DELETE SET NULL,
    storage_key     TEXT    NOT NULL UNIQUE,
    status          TEXT    NOT NULL DEFAULT 'COMPLETED'
                    CHECK (status IN ('PENDING', 'COMPLETED', 'FAILED')),
    size_bytes      INTEGER NOT NULL DEFAULT 0,
    row_count       INTEGER NOT NULL DEFAULT 0,
    created_at      DATETIME NOT NULL,
    expires_at      DATETIME NOT NULL
);
CREATE INDEX IF NOT EXISTS data_exports_created ON data_exports (created_at, id);
CREATE INDEX IF NOT EXISTS data_exports_org ON data_exports (organization_id, id);
