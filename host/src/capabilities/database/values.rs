//! WIT `value`s in and out of each backend.
//!
//! | WIT | PostgreSQL parameter | SQLite parameter |
//! |---|---|---|
//! | `null` | NULL of unspecified type (the server infers it) | NULL |
//! | `boolean` | `bool` | INTEGER 0/1 |
//! | `int` | `int8` | INTEGER |
//! | `float` | `float8` | REAL |
//! | `text` | `text` (cast for other types: `$1::uuid`) | TEXT |
//! | `bytes` | `bytea` | BLOB |
//! | `timestamp` | `timestamptz` | TEXT `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC, fixed width) |
//! | `json` | `jsonb` (must be valid JSON) | TEXT (must be valid JSON) |
//!
//! Columns read back:
//!
//! * PostgreSQL: `bool` → boolean; `int2/int4/int8/oid` → int; `float4/8` →
//!   float; `numeric` → text (exact decimal; `NaN`, `Infinity`);
//!   `text/varchar/bpchar/name/char/citext`, enums → text; `bytea` → bytes;
//!   `timestamptz` → timestamp; `timestamp` → timestamp read as UTC; `date`
//!   → timestamp at 00:00 UTC; `json/jsonb` → json; `uuid` → text
//!   (hyphenated); domains as their base type. Any other type is `invalid`:
//!   cast it in SQL (`col::text`).
//! * SQLite, by storage class: INTEGER → int, REAL → float, TEXT → text,
//!   BLOB → bytes; except a column *declared* `BOOLEAN`/`BOOL` holding an
//!   integer → boolean, and one declared `DATETIME`/`TIMESTAMP` holding
//!   ISO-8601 text → timestamp (text it cannot read stays text).

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgTypeKind, PgValueRef, Postgres};
use sqlx::sqlite::{Sqlite, SqliteValueRef};
use sqlx::{Decode, Encode, Type, TypeInfo, ValueRef, encode::IsNull, error::BoxDynError};

use crate::runtime::bindings::celer::plugin::database::Value;

/// Why a value could not be bound or read.
pub type ValueError = String;

/// What a value costs against the byte budget.
pub fn size(v: &Value) -> u64 {
    match v {
        Value::Null | Value::Boolean(_) => 1,
        Value::Int(_) | Value::Float(_) | Value::Timestamp(_) => 8,
        Value::Text(s) | Value::Json(s) => s.len() as u64,
        Value::Bytes(b) => b.len() as u64,
    }
}

/// A short tag per kind, for PostgreSQL's statement cache key (a cached
/// statement keeps the parameter types of its first use).
pub fn kind_tag(v: &Value) -> char {
    match v {
        Value::Null => 'n',
        Value::Boolean(_) => 'b',
        Value::Int(_) => 'i',
        Value::Float(_) => 'f',
        Value::Text(_) => 't',
        Value::Bytes(_) => 'y',
        Value::Timestamp(_) => 's',
        Value::Json(_) => 'j',
    }
}

pub fn timestamp(micros: i64) -> Result<DateTime<Utc>, ValueError> {
    DateTime::<Utc>::from_timestamp_micros(micros).ok_or_else(|| format!("timestamp {micros} µs is out of range"))
}

/// The SQLite text form of a timestamp: ISO-8601 UTC, microseconds, `Z`.
pub fn timestamp_text(micros: i64) -> Result<String, ValueError> {
    Ok(timestamp(micros)?.to_rfc3339_opts(SecondsFormat::Micros, true))
}

/// Reads the text forms SQLite databases hold: `YYYY-MM-DD[T ]HH:MM[:SS[.f]]`
/// with an optional `Z` / offset (none means UTC), or a bare date.
pub fn parse_timestamp_text(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_micros());
    }
    let unzoned = s.strip_suffix('Z').unwrap_or(s);
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(unzoned, fmt) {
            return Some(t.and_utc().timestamp_micros());
        }
    }
    if let Ok(t) = DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z") {
        return Some(t.timestamp_micros());
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d").ok().map(|d| d.and_hms_opt(0, 0, 0).expect("midnight").and_utc().timestamp_micros())
}

fn check_json(s: &str) -> Result<(), ValueError> {
    serde_json::from_str::<serde::de::IgnoredAny>(s).map(|_| ()).map_err(|e| format!("json parameter is not valid JSON: {e}"))
}

// ---------------------------------------------------------------- PostgreSQL

/// A NULL whose type PostgreSQL infers from where it is used (OID 0), so
/// that `INSERT INTO t (int_col) VALUES ($1)` takes a null.
pub struct UntypedNull;

impl Type<Postgres> for UntypedNull {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(sqlx::postgres::types::Oid(0))
    }
}

impl Encode<'_, Postgres> for UntypedNull {
    fn encode_by_ref(&self, _buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        Ok(IsNull::Yes)
    }
}

/// JSON text bound as `jsonb` (binary format: version 1, then the text).
pub struct JsonbText(pub String);

impl Type<Postgres> for JsonbText {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_name("jsonb")
    }
}

impl Encode<'_, Postgres> for JsonbText {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        buf.push(1);
        buf.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }
}

/// Binds `params` in order for PostgreSQL.
pub fn pg_arguments(params: &[Value]) -> Result<sqlx::postgres::PgArguments, ValueError> {
    use sqlx::Arguments;
    let mut args = sqlx::postgres::PgArguments::default();
    for v in params {
        let added = match v {
            Value::Null => args.add(None::<UntypedNull>),
            Value::Boolean(b) => args.add(*b),
            Value::Int(i) => args.add(*i),
            Value::Float(f) => args.add(*f),
            Value::Text(s) => args.add(s.as_str()),
            Value::Bytes(b) => args.add(b.as_slice()),
            Value::Timestamp(us) => args.add(timestamp(*us)?),
            Value::Json(s) => {
                check_json(s)?;
                args.add(JsonbText(s.clone()))
            }
        };
        added.map_err(|e| format!("cannot bind parameter: {e}"))?;
    }
    Ok(args)
}

mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const UNKNOWN: u32 = 705;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// How to read one PostgreSQL column type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PgRead {
    Bool,
    Int2,
    Int4,
    Int8,
    Oid,
    Float4,
    Float8,
    Numeric,
    Text,
    Bytes,
    TimestampTz,
    Timestamp,
    Date,
    Json,
    Jsonb,
    Uuid,
}

fn pg_read_of(t: &PgTypeInfo) -> Option<PgRead> {
    match t.kind() {
        PgTypeKind::Enum(_) => return Some(PgRead::Text),
        PgTypeKind::Domain(base) => return pg_read_of(base),
        _ => {}
    }
    let by_oid = t.oid().and_then(|o| {
        Some(match o.0 {
            oid::BOOL => PgRead::Bool,
            oid::INT2 => PgRead::Int2,
            oid::INT4 => PgRead::Int4,
            oid::INT8 => PgRead::Int8,
            oid::OID => PgRead::Oid,
            oid::FLOAT4 => PgRead::Float4,
            oid::FLOAT8 => PgRead::Float8,
            oid::NUMERIC => PgRead::Numeric,
            oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::CHAR | oid::UNKNOWN => PgRead::Text,
            oid::BYTEA => PgRead::Bytes,
            oid::TIMESTAMPTZ => PgRead::TimestampTz,
            oid::TIMESTAMP => PgRead::Timestamp,
            oid::DATE => PgRead::Date,
            oid::JSON => PgRead::Json,
            oid::JSONB => PgRead::Jsonb,
            oid::UUID => PgRead::Uuid,
            _ => return None,
        })
    });
    by_oid.or_else(|| t.name().eq_ignore_ascii_case("citext").then_some(PgRead::Text))
}

/// One PostgreSQL value as a WIT value.
pub fn pg_value(v: PgValueRef<'_>, column: &str) -> Result<Value, ValueError> {
    if v.is_null() {
        return Ok(Value::Null);
    }
    let type_info = v.type_info().into_owned();
    let Some(read) = pg_read_of(&type_info) else {
        return Err(format!(
            "column {column:?} has type {}, which the database interface does not map; cast it in SQL (e.g. {column}::text)",
            type_info.name()
        ));
    };
    let e = |e: BoxDynError| format!("column {column:?}: {e}");
    Ok(match read {
        PgRead::Bool => Value::Boolean(<bool as Decode<Postgres>>::decode(v).map_err(e)?),
        PgRead::Int2 => Value::Int(<i16 as Decode<Postgres>>::decode(v).map_err(e)?.into()),
        PgRead::Int4 => Value::Int(<i32 as Decode<Postgres>>::decode(v).map_err(e)?.into()),
        PgRead::Int8 => Value::Int(<i64 as Decode<Postgres>>::decode(v).map_err(e)?),
        PgRead::Oid => Value::Int(<sqlx::postgres::types::Oid as Decode<Postgres>>::decode(v).map_err(e)?.0.into()),
        PgRead::Float4 => Value::Float(<f32 as Decode<Postgres>>::decode(v).map_err(e)?.into()),
        PgRead::Float8 => Value::Float(<f64 as Decode<Postgres>>::decode(v).map_err(e)?),
        PgRead::Numeric => Value::Text(numeric_text(v.as_bytes().map_err(e)?).ok_or_else(|| format!("column {column:?}: malformed numeric"))?),
        PgRead::Text => Value::Text(String::from_utf8_lossy(v.as_bytes().map_err(e)?).into_owned()),
        PgRead::Bytes => Value::Bytes(v.as_bytes().map_err(e)?.to_vec()),
        PgRead::TimestampTz => Value::Timestamp(<DateTime<Utc> as Decode<Postgres>>::decode(v).map_err(e)?.timestamp_micros()),
        PgRead::Timestamp => Value::Timestamp(<NaiveDateTime as Decode<Postgres>>::decode(v).map_err(e)?.and_utc().timestamp_micros()),
        PgRead::Date => Value::Timestamp(
            <NaiveDate as Decode<Postgres>>::decode(v).map_err(e)?.and_hms_opt(0, 0, 0).expect("midnight").and_utc().timestamp_micros(),
        ),
        PgRead::Json => Value::Json(String::from_utf8_lossy(v.as_bytes().map_err(e)?).into_owned()),
        PgRead::Jsonb => {
            let bytes = v.as_bytes().map_err(e)?;
            let text = match bytes.split_first() {
                Some((1, rest)) => rest,
                _ => return Err(format!("column {column:?}: unknown jsonb format")),
            };
            Value::Json(String::from_utf8_lossy(text).into_owned())
        }
        PgRead::Uuid => {
            let bytes = v.as_bytes().map_err(e)?;
            Value::Text(uuid::Uuid::from_slice(bytes).map_err(|x| format!("column {column:?}: {x}"))?.hyphenated().to_string())
        }
    })
}

/// PostgreSQL's binary `numeric` as exact decimal text.
pub fn numeric_text(b: &[u8]) -> Option<String> {
    use std::fmt::Write;
    let word = |i: usize| -> Option<i16> { Some(i16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?])) };
    let ndigits = usize::try_from(word(0)?).ok()?;
    let weight = i64::from(word(2)?);
    let sign = word(4)? as u16;
    let dscale = usize::try_from(word(6)?).ok()?;
    match sign {
        0xC000 => return Some("NaN".into()),
        0xD000 => return Some("Infinity".into()),
        0xF000 => return Some("-Infinity".into()),
        0x0000 | 0x4000 => {}
        _ => return None,
    }
    let digits: Vec<i16> = (0..ndigits).map(|k| word(8 + 2 * k)).collect::<Option<_>>()?;
    let digit = |k: i64| -> i16 { usize::try_from(k).ok().and_then(|k| digits.get(k)).copied().unwrap_or(0) };
    let mut s = String::new();
    if sign == 0x4000 {
        s.push('-');
    }
    if weight < 0 {
        s.push('0');
    } else {
        for k in 0..=weight {
            if k == 0 {
                write!(s, "{}", digit(k)).ok()?;
            } else {
                write!(s, "{:04}", digit(k)).ok()?;
            }
        }
    }
    if dscale > 0 {
        let mut frac = String::new();
        for g in 1..=dscale.div_ceil(4) as i64 {
            write!(frac, "{:04}", digit(weight + g)).ok()?;
        }
        frac.truncate(dscale);
        s.push('.');
        s.push_str(&frac);
    }
    Some(s)
}

// -------------------------------------------------------------------- SQLite

/// Binds `params` in order for SQLite.
pub fn sqlite_arguments(params: &[Value]) -> Result<sqlx::sqlite::SqliteArguments, ValueError> {
    use sqlx::Arguments;
    let mut args = sqlx::sqlite::SqliteArguments::default();
    for v in params {
        let added = match v {
            Value::Null => args.add(None::<i64>),
            Value::Boolean(b) => args.add(*b),
            Value::Int(i) => args.add(*i),
            Value::Float(f) => args.add(*f),
            Value::Text(s) => args.add(s.clone()),
            Value::Bytes(b) => args.add(b.clone()),
            Value::Timestamp(us) => args.add(timestamp_text(*us)?),
            Value::Json(s) => {
                check_json(s)?;
                args.add(s.clone())
            }
        };
        added.map_err(|e| format!("cannot bind parameter: {e}"))?;
    }
    Ok(args)
}

/// One SQLite value as a WIT value; `declared` is the column's declared
/// type as sqlx names it (`BOOLEAN`, `DATETIME`, …), if any.
pub fn sqlite_value(v: SqliteValueRef<'_>, declared: &str, column: &str) -> Result<Value, ValueError> {
    if v.is_null() {
        return Ok(Value::Null);
    }
    let storage = v.type_info().name().to_string();
    let e = |e: BoxDynError| format!("column {column:?}: {e}");
    Ok(match storage.as_str() {
        "INTEGER" => {
            let i = <i64 as Decode<Sqlite>>::decode(v).map_err(e)?;
            if declared == "BOOLEAN" { Value::Boolean(i != 0) } else { Value::Int(i) }
        }
        "REAL" => Value::Float(<f64 as Decode<Sqlite>>::decode(v).map_err(e)?),
        "BLOB" => Value::Bytes(<Vec<u8> as Decode<Sqlite>>::decode(v).map_err(e)?),
        _ => {
            let s = <String as Decode<Sqlite>>::decode(v).map_err(e)?;
            if declared == "DATETIME"
                && let Some(us) = parse_timestamp_text(&s)
            {
                Value::Timestamp(us)
            } else {
                Value::Text(s)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds PostgreSQL's binary numeric from its parts.
    fn numeric(weight: i16, sign: u16, dscale: i16, digits: &[i16]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(digits.len() as i16).to_be_bytes());
        b.extend_from_slice(&weight.to_be_bytes());
        b.extend_from_slice(&sign.to_be_bytes());
        b.extend_from_slice(&dscale.to_be_bytes());
        for d in digits {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b
    }

    #[test]
    fn numerics_read_as_exact_text() {
        assert_eq!(numeric_text(&numeric(0, 0, 0, &[42])).unwrap(), "42");
        assert_eq!(numeric_text(&numeric(1, 0, 2, &[12, 3456, 7800])).unwrap(), "123456.78");
        assert_eq!(numeric_text(&numeric(0, 0x4000, 3, &[1, 5000])).unwrap(), "-1.500");
        assert_eq!(numeric_text(&numeric(-2, 0, 8, &[1234])).unwrap(), "0.00001234");
        assert_eq!(numeric_text(&numeric(2, 0, 0, &[1])).unwrap(), "100000000");
        assert_eq!(numeric_text(&numeric(0, 0, 0, &[])).unwrap(), "0");
        assert_eq!(numeric_text(&numeric(0, 0xC000, 0, &[])).unwrap(), "NaN");
        assert!(numeric_text(&[0, 1]).is_none());
    }

    #[test]
    fn timestamps_are_fixed_width_utc_text_on_sqlite() {
        assert_eq!(timestamp_text(0).unwrap(), "1970-01-01T00:00:00.000000Z");
        assert_eq!(timestamp_text(1_795_780_800_123_456).unwrap(), "2026-11-27T12:00:00.123456Z");
        assert_eq!(timestamp_text(-1).unwrap(), "1969-12-31T23:59:59.999999Z");
        assert!(timestamp_text(i64::MAX).is_err());
        for (text, us) in [
            ("2026-11-27T12:00:00.123456Z", 1_795_780_800_123_456),
            ("2026-11-27 12:00:00.123456", 1_795_780_800_123_456),
            ("2026-11-27 12:00:00", 1_795_780_800_000_000),
            ("2026-11-27T13:00:00+01:00", 1_795_780_800_000_000),
            ("2026-11-27", 1_795_737_600_000_000),
        ] {
            assert_eq!(parse_timestamp_text(text), Some(us), "{text}");
        }
        assert_eq!(parse_timestamp_text("soon"), None);
        let us = 1_795_780_800_654_321;
        assert_eq!(parse_timestamp_text(&timestamp_text(us).unwrap()), Some(us));
    }

    #[test]
    fn sizes_and_tags() {
        assert_eq!(size(&Value::Text("abc".into())), 3);
        assert_eq!(size(&Value::Int(1)), 8);
        assert_eq!(size(&Value::Null), 1);
        assert_eq!(kind_tag(&Value::Json("{}".into())), 'j');
        assert!(pg_arguments(&[Value::Json("{nope".into())]).is_err());
        assert!(sqlite_arguments(&[Value::Json("[1, 2]".into())]).is_ok());
        assert!(pg_arguments(&[Value::Null, Value::Timestamp(0), Value::Bytes(vec![1])]).is_ok());
    }
}
