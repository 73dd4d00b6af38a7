//! What an organization's export holds: one JSON file per table, each row
//! an object, read page by page in key order (keyset pagination, so that a
//! page costs the same at the start and the end of a million rows, and no
//! query holds a snapshot or a row budget for long).
//!
//! The SQL is the same on PostgreSQL and SQLite: `$n` placeholders, no
//! backend functions, row-value comparisons for two-column keys. Values are
//! rendered the same whatever the backend returns (SQLite's 0/1 and text
//! timestamps, PostgreSQL's booleans and `timestamp`s), so an export of the
//! same data is byte-identical on both.

use celer_plugin::database::Value as Db;
use celer_plugin::time;

/// How a column is rendered in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A number (ids, sizes).
    Int,
    /// A string.
    Text,
    /// `true`/`false` (SQLite stores 0/1).
    Bool,
    /// `"YYYY-MM-DDTHH:MM:SS.ffffffZ"` (PostgreSQL returns a timestamp,
    /// SQLite the text the host stored).
    Time,
}

/// How a table is paged: by one key column, or by two (child rows of a
/// parent table, ordered by parent id then own id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// The column at this index (in `columns`) is the key.
    One(usize),
    /// These two columns, in order.
    Two(usize, usize),
}

/// One file of the export.
#[derive(Debug)]
pub struct Table {
    /// Name in the result and in the zip (`<name>.json`).
    pub name: &'static str,
    /// Output field names and kinds, in the SELECT's column order.
    pub columns: &'static [(&'static str, Kind)],
    /// `$1` = organization id.
    pub count_sql: &'static str,
    /// `$1` = organization id, then the last key seen (one or two values),
    /// then the page size.
    pub page_sql: &'static str,
    pub key: Key,
}

use Kind::{Bool, Int, Text, Time};

/// The organization row itself (`organization.json`, one object).
pub const ORGANIZATION_SQL: &str =
    "SELECT id, name, created_by, created_at, updated_at FROM organizations WHERE id = $1";
pub const ORGANIZATION_COLUMNS: &[(&str, Kind)] =
    &[("id", Int), ("name", Text), ("created_by", Int), ("created_at", Time), ("updated_at", Time)];

/// Who may ask for an export: an owner or admin of the organization.
pub const ROLE_SQL: &str = "SELECT role FROM memberships WHERE organization_id = $1 AND user_id = $2";
pub const ALLOWED_ROLES: &[&str] = &["owner", "admin"];

/// Every table of an organization, in the order they are written.
pub const TABLES: &[Table] = &[
    Table {
        name: "members",
        columns: &[
            ("id", Int),
            ("user_id", Int),
            ("email", Text),
            ("name", Text),
            ("language", Text),
            ("role", Text),
            ("joined_at", Time),
        ],
        count_sql: "SELECT count(*) FROM memberships WHERE organization_id = $1",
        page_sql: "SELECT m.id, m.user_id, u.email, u.name, u.language, m.role, m.created_at \
                   FROM memberships m JOIN users u ON u.id = m.user_id \
                   WHERE m.organization_id = $1 AND m.id > $2 ORDER BY m.id LIMIT $3",
        key: Key::One(0),
    },
    Table {
        name: "contacts",
        columns: &[
            ("id", Int),
            ("name", Text),
            ("email", Text),
            ("phone", Text),
            ("notes", Text),
            ("created_by", Int),
            ("created_at", Time),
            ("updated_at", Time),
        ],
        count_sql: "SELECT count(*) FROM contacts WHERE organization_id = $1",
        page_sql: "SELECT id, name, email, phone, notes, created_by, created_at, updated_at FROM contacts \
                   WHERE organization_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        key: Key::One(0),
    },
    Table {
        name: "images",
        columns: &[
            ("id", Int),
            ("storage_key", Text),
            ("filename", Text),
            ("content_type", Text),
            ("size_bytes", Int),
            ("created_by", Int),
            ("created_at", Time),
        ],
        count_sql: "SELECT count(*) FROM images WHERE organization_id = $1",
        page_sql: "SELECT id, storage_key, filename, content_type, size_bytes, created_by, created_at FROM images \
                   WHERE organization_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        key: Key::One(0),
    },
    Table {
        name: "image_relations",
        columns: &[
            ("image_id", Int),
            ("id", Int),
            ("content_type", Text),
            ("object_id", Int),
            ("created_at", Time),
        ],
        count_sql: "SELECT count(*) FROM image_relations r JOIN images i ON i.id = r.image_id \
                    WHERE i.organization_id = $1",
        page_sql: "SELECT r.image_id, r.id, r.content_type, r.object_id, r.created_at \
                   FROM image_relations r JOIN images i ON i.id = r.image_id \
                   WHERE i.organization_id = $1 AND i.id >= $2 AND (r.image_id, r.id) > ($2, $3) \
                   ORDER BY r.image_id, r.id LIMIT $4",
        key: Key::Two(0, 1),
    },
    Table {
        name: "tags",
        columns: &[("id", Int), ("name", Text), ("created_by", Int), ("created_at", Time)],
        count_sql: "SELECT count(*) FROM tags WHERE organization_id = $1",
        page_sql: "SELECT id, name, created_by, created_at FROM tags \
                   WHERE organization_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        key: Key::One(0),
    },
    Table {
        name: "tag_relations",
        columns: &[
            ("tag_id", Int),
            ("id", Int),
            ("content_type", Text),
            ("object_id", Int),
            ("created_at", Time),
        ],
        count_sql: "SELECT count(*) FROM tag_relations r JOIN tags t ON t.id = r.tag_id \
                    WHERE t.organization_id = $1",
        page_sql: "SELECT r.tag_id, r.id, r.content_type, r.object_id, r.created_at \
                   FROM tag_relations r JOIN tags t ON t.id = r.tag_id \
                   WHERE t.organization_id = $1 AND t.id >= $2 AND (r.tag_id, r.id) > ($2, $3) \
                   ORDER BY r.tag_id, r.id LIMIT $4",
        key: Key::Two(0, 1),
    },
    Table {
        name: "events",
        columns: &[
            ("id", Int),
            ("name", Text),
            ("description", Text),
            ("status", Text),
            ("start_date", Time),
            ("end_date", Time),
            ("created_by", Int),
            ("created_at", Time),
            ("updated_at", Time),
        ],
        count_sql: "SELECT count(*) FROM events WHERE organization_id = $1",
        page_sql: "SELECT id, name, description, status, start_date, end_date, created_by, created_at, updated_at \
                   FROM events WHERE organization_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        key: Key::One(0),
    },
    Table {
        name: "event_attendees",
        columns: &[
            ("event_id", Int),
            ("id", Int),
            ("user_id", Int),
            ("reminder_sent_at", Time),
            ("created_at", Time),
        ],
        count_sql: "SELECT count(*) FROM event_attendees a JOIN events e ON e.id = a.event_id \
                    WHERE e.organization_id = $1",
        page_sql: "SELECT a.event_id, a.id, a.user_id, a.reminder_sent_at, a.created_at \
                   FROM event_attendees a JOIN events e ON e.id = a.event_id \
                   WHERE e.organization_id = $1 AND e.id >= $2 AND (a.event_id, a.id) > ($2, $3) \
                   ORDER BY a.event_id, a.id LIMIT $4",
        key: Key::Two(0, 1),
    },
];

/// Where paging starts: before every key.
pub fn first_key(key: Key) -> Vec<Db> {
    match key {
        Key::One(_) => vec![Db::Int(i64::MIN)],
        Key::Two(..) => vec![Db::Int(i64::MIN), Db::Int(i64::MIN)],
    }
}

/// The key of `row`, to continue after it.
pub fn key_of(key: Key, row: &[Db]) -> Option<Vec<Db>> {
    let int = |i: usize| row.get(i).and_then(Db::as_i64).map(Db::Int);
    match key {
        Key::One(a) => Some(vec![int(a)?]),
        Key::Two(a, b) => Some(vec![int(a)?, int(b)?]),
    }
}

/// The parameters of a page query.
pub fn page_params(org_id: i64, after: &[Db], limit: u32) -> Vec<Db> {
    let mut p = Vec::with_capacity(after.len() + 2);
    p.push(Db::Int(org_id));
    p.extend_from_slice(after);
    p.push(Db::Int(i64::from(limit)));
    p
}

/// Appends `row` as one JSON object, fields named and rendered by `columns`.
pub fn write_row(out: &mut Vec<u8>, columns: &[(&str, Kind)], row: &[Db]) {
    out.push(b'{');
    for (i, (name, kind)) in columns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, name);
        out.push(b':');
        write_value(out, *kind, row.get(i).unwrap_or(&Db::Null));
    }
    out.push(b'}');
}

/// One value, as `kind` says, leniently: whatever the backend returned is
/// rendered as something faithful rather than dropped.
pub fn write_value(out: &mut Vec<u8>, kind: Kind, value: &Db) {
    match (kind, value) {
        (_, Db::Null) => out.extend_from_slice(b"null"),
        (Bool, Db::Int(i)) => out.extend_from_slice(if *i != 0 { b"true" } else { b"false" }),
        (_, Db::Boolean(b)) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        (_, Db::Int(i)) => out.extend_from_slice(i.to_string().as_bytes()),
        (_, Db::Float(f)) if f.is_finite() => {
            // serde_json prints floats the shortest way that round-trips.
            out.extend_from_slice(serde_json::Number::from_f64(*f).map(|n| n.to_string()).unwrap_or_default().as_bytes())
        }
        (_, Db::Float(_)) => out.extend_from_slice(b"null"),
        (Time, Db::Text(s)) => match time::parse_utc(s) {
            Some(t) => write_str(out, &time::format_utc(t)),
            None => write_str(out, s),
        },
        (_, Db::Text(s)) => write_str(out, s),
        (_, Db::Timestamp(t)) => write_str(out, &time::format_utc(*t)),
        (_, Db::Json(s)) => match serde_json::from_str::<serde_json::Value>(s) {
            Ok(v) => out.extend_from_slice(v.to_string().as_bytes()),
            Err(_) => write_str(out, s),
        },
        (_, Db::Bytes(b)) => {
            let mut hex = String::with_capacity(b.len() * 2);
            for byte in b {
                hex.push_str(&format!("{byte:02x}"));
            }
            write_str(out, &hex);
        }
    }
}

/// A JSON string literal.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_json(columns: &[(&str, Kind)], row: &[Db]) -> serde_json::Value {
        let mut out = Vec::new();
        write_row(&mut out, columns, row);
        serde_json::from_slice(&out).expect("valid JSON")
    }

    #[test]
    fn sqlite_and_postgres_values_render_identically() {
        let cols = &[("id", Int), ("ok", Bool), ("at", Time), ("name", Text)];
        let sqlite = row_json(cols, &[
            Db::Int(1),
            Db::Int(1),
            Db::Text("2026-11-22T12:00:00.000000Z".into()),
            Db::Text("Ann \"A\"\n".into()),
        ]);
        let postgres = row_json(cols, &[
            Db::Int(1),
            Db::Boolean(true),
            Db::Timestamp(time::parse_utc("2026-11-22T12:00:00Z").unwrap()),
            Db::Text("Ann \"A\"\n".into()),
        ]);
        assert_eq!(sqlite, postgres);
        assert_eq!(sqlite, serde_json::json!({"id": 1, "ok": true, "at": "2026-11-22T12:00:00.000000Z", "name": "Ann \"A\"\n"}));
    }

    #[test]
    fn odd_values_are_kept_not_dropped() {
        let cols = &[("a", Text), ("b", Time), ("c", Int), ("d", Text), ("e", Text), ("f", Int)];
        let v = row_json(cols, &[
            Db::Json(r#"{"x": [1]}"#.into()),
            Db::Text("not a time".into()),
            Db::Float(f64::NAN),
            Db::Bytes(vec![0, 255]),
            Db::Null,
            Db::Float(1.5),
        ]);
        assert_eq!(v, serde_json::json!({"a": {"x": [1]}, "b": "not a time", "c": null, "d": "00ff", "e": null, "f": 1.5}));
        // A short row: missing columns are null.
        assert_eq!(row_json(&[("a", Int), ("b", Int)], &[Db::Int(1)]), serde_json::json!({"a": 1, "b": null}));
    }

    #[test]
    fn paging_keys_and_parameters() {
        for t in TABLES {
            let n = match t.key {
                Key::One(a) => {
                    assert!(a < t.columns.len());
                    3
                }
                Key::Two(a, b) => {
                    assert!(a < t.columns.len() && b < t.columns.len());
                    4
                }
            };
            assert!(t.page_sql.contains(&format!("${n}")) && !t.page_sql.contains(&format!("${}", n + 1)), "{}", t.name);
            assert_eq!(page_params(7, &first_key(t.key), 10).len(), n, "{}", t.name);
            assert!(t.page_sql.starts_with("SELECT ") && t.count_sql.starts_with("SELECT count(*)"));
            let select_list = &t.page_sql["SELECT ".len()..t.page_sql.find(" FROM ").unwrap()];
            assert_eq!(select_list.split(", ").count(), t.columns.len(), "{}: columns and SELECT list differ", t.name);
        }
        let row = [Db::Int(5), Db::Int(9), Db::Text("x".into())];
        assert_eq!(key_of(Key::Two(0, 1), &row), Some(vec![Db::Int(5), Db::Int(9)]));
        assert_eq!(key_of(Key::One(2), &row), None);
        assert_eq!(page_params(7, &[Db::Int(3)], 100), vec![Db::Int(7), Db::Int(3), Db::Int(100)]);
    }
}
